"""Image pretraining: digits learning signal, data sets and their errors, evaluation, resume, DDP, encoder.pt bridge."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minc_rl.ssl.augment import TwoViewAugment, simclr_pipeline
from minc_rl.ssl.backbones import build_backbone
from minc_rl.ssl.data import DataRootError, load_data
from minc_rl.ssl.encoders import build_encoder, load_encoder_weights
from minc_rl.ssl.linear_eval import knn_accuracy, linear_probe_accuracy
import minc_rl.ssl.pretraining
from omegaconf import OmegaConf
from minc_rl.common.io import atomic_torch_save
from minc_rl.ssl.pretraining import LARS, CheckpointWriteError, compose_config, pretrain, scaled_lr
from test_packaging import installed  # noqa: F401  (the module-scoped wheel fixture)

QUIET = ["progress=false", "eval.every=1000", "device=cpu"]
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchvision_imports() -> bool:
    """Whether torchvision (the `vision` extra) is installed and imports beside this torch."""
    try:
        import torchvision.models  # noqa: F401
    except Exception:  # not installed (ImportError), or built for another torch (RuntimeError at import)
        return False
    return True


needs_torchvision = pytest.mark.skipif(
    not torchvision_imports(), reason="the ResNet backbones need the `vision` extra (torchvision matching this torch)"
)


def run(out_dir: Path, *overrides: str) -> dict:
    return pretrain(compose_config([*QUIET, *overrides]), out_dir)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------- digits: the learning signal and the outputs


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """200 steps of MINC on digits (B=128, AdamW 1e-3, ema=1.0), the random-init backbone evaluated first."""
    out = tmp_path_factory.mktemp("digits")
    torch.set_num_threads(1)
    run(out, "loss=minc", "loss.ema=1.0", "steps=200", "lr=0.001", "eval.every=5", "checkpoint_every=5")
    return out


def test_digits_minc_beats_random_init_on_held_out_split(digits_run):
    summary = json.loads((digits_run / "summary.json").read_text())
    initial, final = summary["initial"], summary["final"]
    assert initial["step"] == 0 and final["step"] == 200
    # 360 held-out digits: the random-init probe makes ~22 errors; the pretrained one must make ~1/3 fewer
    assert final["probe_acc"] >= initial["probe_acc"] + 0.02, (initial, final)
    assert final["knn_acc"] >= initial["knn_acc"] + 0.03, (initial, final)
    assert final["collapsed"] == 0 and final["val_rankme"] > 10


def test_digits_run_writes_config_metrics_checkpoint_and_encoder(digits_run):
    assert (digits_run / "config.yaml").read_text().count("name: digits") == 1
    rows = list(csv.DictReader(open(digits_run / "metrics.csv")))
    # 11 steps per epoch (1437 train images, B=128, drop_last): 19 epochs, the 19th cut at step 200
    assert [int(r["epoch"]) for r in rows] == list(range(0, 20))
    assert [r["probe_acc"] != "" for r in rows] == [e % 5 == 0 or e == 19 for e in range(20)]
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows[1:])  # finite, logged every epoch
    assert all(float(r["lambda_eig_max"]) > 0 for r in rows[1:])
    assert list((digits_run / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = torch.load(digits_run / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 19 and checkpoint["step"] == 200
    assert checkpoint["loss"]["ema_sum"].dtype == torch.float32 and int(checkpoint["loss"]["steps"]) == 200
    assert torch.isfinite(checkpoint["loss"]["ema_sum"]).all()
    assert checkpoint["optimizer"]["state"], "optimizer moments are saved"
    backbone = build_backbone("convnet", (1, 8, 8))
    load_encoder_weights(str(digits_run / "encoder.pt"), backbone, "convnet", (1, 8, 8))
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, checkpoint["model"][f"backbone.{name}"])


def test_linear_eval_entry_point_on_pretraining_checkpoint(digits_run, tmp_path):
    command = [
        sys.executable, "-m", "minc_rl.linear_eval", f"checkpoint={digits_run}", "epochs=3", "batch_size=64",
        "crop_scale=[0.6,1.0]", "flip=0.0", "progress=false", "device=cpu", f"hydra.run.dir={tmp_path}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "linear_eval.json").read_text())
    assert result["pretrain_epoch"] == 19 and result["epochs"] == 3
    assert result["val_top1"] > 0.6  # chance is 0.1; 3 epochs of SGD on frozen features
    assert result["lr"] == pytest.approx(0.1 * 64 / 256)


def test_entry_point_mistakes_are_one_line_with_exit_code_2(digits_run, tmp_path):
    """pretrain and linear_eval check the command line before Hydra starts, and name what to give instead."""
    with zipfile.ZipFile(tmp_path / "agent.zip", "w") as archive:  # the layout of an SB3 save
        archive.writestr("data", "{}")
        archive.writestr("policy.pth", b"")
    cases = {
        ("minc_rl.linear_eval", "epochs=3"): "checkpoint= is required; python -m minc_rl.linear_eval --help",
        ("minc_rl.linear_eval", f"checkpoint={digits_run}", "epoch=3"): "epoch is not a key of minc_rl.linear_eval's "
                                                                         "config; did you mean epochs?",
        ("minc_rl.linear_eval", f"checkpoint={digits_run / 'encoder.pt'}"): "is an encoder.pt (the backbone's weights",
        ("minc_rl.linear_eval", f"checkpoint={tmp_path / 'agent.zip'}"): "is an SB3 agent (a minc_rl.train checkpoint)",
        ("minc_rl.pretrain", "bach_size=64"): "bach_size is not a key of minc_rl.pretrain's config; did you mean batch_size?",
        ("minc_rl.pretrain", "loss=minx"): "loss='minx' is not valid; choose one of 'infonce', 'minc', 'selfpred', 'spectral'",
        ("minc_rl.pretrain", "device=cuda", "steps=1"): "device='cuda', but this torch",
        ("minc_rl.pretrain", "data=procgen", "data.games=[coinrun,nope]", "device=cpu"): "unknown procgen game(s) ['nope']",
    }
    def run(index: int, program: str, *overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", program, *overrides, f"hydra.run.dir={tmp_path / f'out{index}'}"],
                              capture_output=True, text=True, env=subprocess_env(), timeout=120)

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # each case is a fresh interpreter importing torch
        runs = [pool.submit(run, index, *case) for index, case in enumerate(cases)]
    for ((program, *overrides), message), future in zip(cases.items(), runs):
        done = future.result()
        assert done.returncode == 2, (overrides, done.stderr[-2000:])
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(f"{program}: error: ") and message in line, line
    helped = subprocess.run([sys.executable, "-m", "minc_rl.pretrain", "--help"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("minc_rl.pretrain: pretrain an image encoder")


def test_a_full_disk_at_the_checkpoint_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch):
    def disk_full(state, path):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1664 vs 1560")

    monkeypatch.setattr(minc_rl.ssl.pretraining, "atomic_torch_save", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*checkpoint.pt \(RuntimeError: \[enforce fail .*"
                                                   r"the previous checkpoint is intact: free disk space, then resume"):
        run(tmp_path, "steps=2", "batch_size=64", "eval.at_start=false")


def test_resume_after_a_crash_continues_exactly_where_the_run_stopped(tmp_path, monkeypatch):
    common = ["loss=minc", "batch_size=256", "epochs=3", "eval.at_start=false", "checkpoint_every=1"]
    run(tmp_path / "full", *common)

    def save_then_crash(state, path):
        atomic_torch_save(state, path)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(minc_rl.ssl.pretraining, "atomic_torch_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", *common)
    monkeypatch.undo()
    run(tmp_path / "crashed", *common, f"resume={tmp_path / 'crashed'}")
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == full["step"] == 3 * 5
    torch.testing.assert_close(resumed["model"], full["model"])
    torch.testing.assert_close(resumed["loss"], full["loss"])
    torch.testing.assert_close(resumed["optimizer"], full["optimizer"])
    rows = list(csv.DictReader(open(tmp_path / "crashed" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # appended after the crash, one header
    with pytest.raises(ValueError, match="checkpoint has .*'minc'.*this run .*'spectral'"):
        run(tmp_path / "bad", "loss=spectral", "batch_size=256", f"resume={tmp_path / 'crashed'}")
    # networks of another shape, or an EMA target the checkpoint lacks: one line, not load_state_dict's traceback
    with pytest.raises(ValueError, match="networks were built with head: .*'out_dim': 64.*; this run asks for .*'out_dim': 32"):
        run(tmp_path / "bad", *common, "head.out_dim=32", f"resume={tmp_path / 'crashed'}")
    with pytest.raises(ValueError, match="networks were built with an EMA target: False; this run asks for True"):
        run(tmp_path / "bad", *common, "target_momentum=0.99", f"resume={tmp_path / 'crashed'}")


def test_cli_resume_takes_the_runs_own_settings_not_the_defaults(tmp_path, monkeypatch):
    """`python -m minc_rl.pretrain resume=<dir>`, as a stop prints it, continues with the run's epochs and batch size
    (3 and 256 here, not digits' defaults), and refuses a change of loss or another run dir in one line."""
    common = ["loss=minc", "batch_size=256", "epochs=3", "eval.at_start=false", "checkpoint_every=1"]

    def save_then_crash(state, path):
        atomic_torch_save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(minc_rl.ssl.pretraining, "atomic_torch_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", *common)
    monkeypatch.undo()

    def cli(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "minc_rl.pretrain", *overrides, "progress=false", "device=cpu"],
                              capture_output=True, text=True, env=subprocess_env(), timeout=300)

    refused = cli(f"resume={tmp_path / 'run'}", "loss=spectral")
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"minc_rl.pretrain: error: resume: the run in {tmp_path / 'run'} has loss=minc; it cannot continue with loss=spectral")
    refused = cli(f"resume={tmp_path / 'run'}", "head.hidden_dim=128")
    assert refused.returncode == 2 and refused.stderr.strip().endswith("has head.hidden_dim=256; it cannot continue with "
                                                                       "head.hidden_dim=128")  # fmt: skip
    elsewhere = cli(f"resume={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'other'}")
    assert elsewhere.returncode == 2 and f"continues in {tmp_path / 'run'}" in elsewhere.stderr
    done = cli(f"resume={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["step"]) == (3, 3 * 5)  # 1,437 digits / 256 = 5 steps per epoch
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert (saved.epochs, saved.batch_size, saved.resume) == (3, 256, str(tmp_path / "run"))


def test_bf16_autocast_keeps_lambda_float32_and_finite_and_wandb_logs_offline(tmp_path):
    summary = run(tmp_path, "precision=bf16", "steps=3", "batch_size=32", "eval.at_start=false", "wandb.enabled=true")
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["loss"]["ema_sum"].dtype == torch.float32
    assert torch.isfinite(checkpoint["loss"]["ema_sum"]).all() and summary["skipped_batches"] == 0
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))


def test_a_diverged_run_skips_non_finite_batches_and_writes_no_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite weights or Lambda at epoch 1; checkpoint not written"):
        run(tmp_path, "optimizer=sgd", "lr=1e15", "steps=5", "batch_size=64", "eval.at_start=false")
    assert not (tmp_path / "checkpoint.pt").exists()
    (row,) = csv.DictReader(open(tmp_path / "metrics.csv"))  # the epoch is still logged
    assert int(row["skipped_batches"]) >= 1 and row["probe_acc"] == "nan" and row["collapsed"] == "1"
    assert float(row["lambda_eig_max"]) == float(row["lambda_eig_max"])  # Lambda stayed finite


def test_a_stop_inside_an_epoch_resumes_exactly_and_metrics_get_no_duplicate_rows(tmp_path, monkeypatch):
    common = ["loss=minc", "batch_size=256", "epochs=3", "eval.at_start=false", "checkpoint_every=1"]
    run(tmp_path / "full", *common)
    real_step = minc_rl.ssl.pretraining.train_step

    def signal_at_step_7(run_, *args):
        result = real_step(run_, *args)
        if run_.step == 6:  # the 7th step, the 2nd of epoch 2 (5 steps per epoch): as if SIGTERM came during it
            run_.stop.signum = signal.SIGTERM
        return result

    monkeypatch.setattr(minc_rl.ssl.pretraining, "train_step", signal_at_step_7)
    summary = run(tmp_path / "stopped", *common)
    monkeypatch.undo()
    assert (summary["interrupted"], summary["steps"]) == ("SIGTERM", 7)
    stopped = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert (stopped["epoch"], stopped["batches_done"], stopped["step"]) == (1, 2, 7)
    assert (tmp_path / "stopped" / "encoder.pt").exists()
    run(tmp_path / "stopped", *common, f"resume={tmp_path / 'stopped'}")
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == full["step"] == 15
    torch.testing.assert_close(resumed["model"], full["model"])  # the same batches and augmentations, in order
    torch.testing.assert_close(resumed["loss"], full["loss"])
    rows = list(csv.DictReader(open(tmp_path / "stopped" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_ctrl_c_sets_the_stop_flag_and_a_second_one_acts_as_usual():
    before = signal.getsignal(signal.SIGINT)
    with minc_rl.ssl.pretraining.StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode
        assert stop.signum == signal.SIGINT  # no KeyboardInterrupt: the loop stops after its step
        assert signal.getsignal(signal.SIGINT) is before  # a second Ctrl-C interrupts as usual
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_writes_checkpoint_encoder_and_summary_and_exits_143(tmp_path):
    out, signum = tmp_path / "run", signal.SIGTERM
    command = [
        sys.executable, "-m", "minc_rl.pretrain", "epochs=100000", "eval.every=100000", "eval.at_start=false",
        "progress=false", "device=cpu", f"hydra.run.dir={out}",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.csv").exists() and len((out / "metrics.csv").read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    sent = time.monotonic()
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert process.returncode == 128 + signum, stderr[-3000:]
    name = signal.Signals(signum).name
    assert f"minc_rl.pretrain: interrupted ({name}) at step" in stdout and f"resume={out}" in stdout
    assert "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert summary["interrupted"] == name and summary["steps"] == checkpoint["step"] >= 22
    assert (out / "encoder.pt").exists()


def test_a_damaged_pretraining_checkpoint_or_a_used_run_dir_is_one_line(digits_run, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((digits_run / "checkpoint.pt").read_bytes()[:2000])
    with pytest.raises(ValueError, match=rf"^resume={truncated}: not a readable pretraining checkpoint \(RuntimeError: "):
        run(tmp_path / "a", f"resume={truncated}")
    atomic_torch_save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=rf"^resume={tmp_path / 'foreign.pt'}: not a pretraining checkpoint of minc_rl.pretrain \(it lacks config, epoch"):
        run(tmp_path / "b", f"resume={tmp_path / 'foreign.pt'}")
    before = (digits_run / "metrics.csv").read_bytes()
    with pytest.raises(ValueError, match=rf"^{digits_run} already holds a run \(checkpoint.pt, metrics.csv, encoder.pt, summary.json\); continue it with resume={digits_run}"):
        run(digits_run, "steps=1")
    assert (digits_run / "metrics.csv").read_bytes() == before
    done = subprocess.run(
        [sys.executable, "-m", "minc_rl.pretrain", f"resume={truncated}", f"hydra.run.dir={tmp_path / 'cli'}", "device=cpu"],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"minc_rl.pretrain: error: resume={truncated}: not a readable pretraining checkpoint (RuntimeError: "
        + done.stderr.split("(RuntimeError: ", 1)[1].strip()
    ]


@pytest.mark.parametrize("loss", ["spectral", "infonce"])
def test_baseline_losses_and_ema_target_encoder_train(tmp_path, loss):
    summary = run(tmp_path, f"loss={loss}", "steps=2", "batch_size=32", "target_momentum=0.9", "eval.at_start=false")
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    moved = [
        not torch.equal(checkpoint["target"][k], checkpoint["model"][k])
        for k in checkpoint["model"] if checkpoint["model"][k].is_floating_point()
    ]
    assert any(moved)  # the target lags the online network
    assert summary["final"]["probe_acc"] > 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("precision=fp16", "precision='fp16' is not valid; choose one of 'fp32', 'bf16'"),
        ("optimizer=rmsprop", "optimizer='rmsprop' is not valid; choose one of 'sgd', 'lars', 'adamw'"),
        ("batch_size=1", "batch_size must be an integer >= 2; got 1"),
        ("lr=abc", "lr must be a finite number > 0; got 'abc'"),
        ("weight_decay=-1", "weight_decay must be a finite number >= 0; got -1"),
        ("eval.every=0", "eval.every must be an integer >= 1; got 0"),
        ("progress=maybe", "progress must be true or false; got 'maybe'"),
        ("batch_size=4096", "batch_size=4096 is larger than the 1437 training pairs"),
        ("backbone=vgg", "unknown backbone 'vgg'; valid backbones: resnet18, resnet50, convnet, impala"),
        ("lr_scaling=cubic", "lr_scaling='cubic' is not valid; choose one of 'linear', 'sqrt', 'none'"),
        ("target_momentum=1.5", "target_momentum must be in"),
        ("epochs=0", "epochs must be an integer >= 1; got 0"),  # it would write the untrained encoder as a result
        ("steps=0", "steps must be an integer >= 1; got 0"),
    ],
)
def test_bad_options_name_the_value_and_the_valid_ones(tmp_path, override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        run(tmp_path, override)


# ---------------------------------------------------------------- data sets on disk, and their errors


def write_cifar(root: Path, per_batch: int = 16) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(per_batch)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, handle)
    return folder


def write_imagefolder(root: Path, size: int = 40, per_class: int = 6) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for shade, name in ((40, "cat"), (200, "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(rng.normal(shade, 20, (size, size + 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


@needs_torchvision
def test_cifar_fixture_trains_a_resnet18_small_stem_step_and_evaluates(tmp_path):
    write_cifar(tmp_path / "cifar")
    data = load_data("cifar10", root=str(tmp_path / "cifar"))
    assert data.train.images.shape == (80, 3, 32, 32) and data.val.images.shape == (16, 3, 32, 32)
    assert data.class_names[3] == "c3" and data.train.labels[:3].tolist() == [0, 1, 2]
    summary = run(
        tmp_path / "run", "data=cifar10", f"data.root={tmp_path / 'cifar'}", "backbone=resnet18",
        "batch_size=16", "steps=1", "eval.at_start=false", "eval.max_samples=12",  # a fixed subset of each split
    )
    assert summary["steps"] == 1 and summary["backbone"] == "resnet18"
    assert 0.0 <= summary["final"]["probe_acc"] <= 1.0 and 0.0 <= summary["final"]["knn_acc"] <= 1.0
    resnet = build_backbone("resnet18", (3, 32, 32))
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, nn.Identity) and resnet.features_dim == 512
    assert resnet(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_imagefolder_fixture_trains_a_step_and_evaluates(tmp_path):
    write_imagefolder(tmp_path / "images")
    data = load_data("imagefolder", root=str(tmp_path / "images"), load_size=36)
    images, positives, labels = data.train.__getitems__([0, 11])
    assert images.shape == (2, 3, 36, 36) and images.dtype == torch.uint8 and positives is images
    assert labels.tolist() == [0, 1] and data.class_names == ["cat", "dog"]
    summary = run(
        tmp_path / "run", "data=imagefolder", f"data.root={tmp_path / 'images'}", "data.load_size=36",
        "data.image_size=32", "backbone=convnet", "optimizer=adamw", "lr=0.001", "batch_size=4", "steps=1",
        "num_workers=0", "eval.at_start=false",
    )
    assert summary["steps"] == 1
    assert summary["final"]["knn_acc"] == 1.0  # dark cats and bright dogs: even one step separates them


def test_an_undecodable_image_is_one_line_naming_the_file(tmp_path):
    """A file Pillow cannot decode, found when its batch is loaded (here in a DataLoader worker, whose error torch
    re-raises with the worker's traceback): one line naming it, exit code 2."""
    write_imagefolder(tmp_path / "images", per_class=2)
    broken = tmp_path / "images" / "train" / "cat" / "1.png"
    broken.write_bytes(b"not a png")
    expected = (f"imagefolder file {str(broken)!r} cannot be decoded as an image (UnidentifiedImageError: cannot "
                f"identify image file {str(broken)!r}); remove or replace it")
    with pytest.raises(DataRootError) as error:
        load_data("imagefolder", root=str(tmp_path / "images"), load_size=36).train.__getitems__([0, 1, 2])
    assert str(error.value) == expected
    done = subprocess.run(
        [sys.executable, "-m", "minc_rl.pretrain", "data=imagefolder", f"data.root={tmp_path / 'images'}",
         "data.load_size=36", "data.image_size=32", "backbone=convnet", "batch_size=4", "steps=2", "num_workers=1",
         "eval.at_start=false", "progress=false", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=subprocess_env(), timeout=120)  # fmt: skip
    assert (done.returncode, done.stderr.strip().splitlines()) == (2, [f"minc_rl.pretrain: error: {expected}"])


def test_missing_or_malformed_data_roots_say_what_layout_is_expected(tmp_path):
    with pytest.raises(DataRootError, match=r"cifar10 data root '.*nowhere' has no CIFAR-10 batches.*data_batch_1"):
        load_data("cifar10", root=str(tmp_path / "nowhere"))
    folder = write_cifar(tmp_path / "cifar")
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataRootError, match=r"cifar10 file '.*data_batch_3' is missing or malformed.*test_batch"):
        load_data("cifar10", root=str(tmp_path / "cifar"))
    with pytest.raises(DataRootError, match="cifar10 needs data.root"):
        load_data("cifar10")
    (tmp_path / "images" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataRootError, match=r"no class folders in '.*images/val'; expected <root>/train/<class>"):
        load_data("imagefolder", root=str(tmp_path / "images"))
    (tmp_path / "images" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataRootError, match=r"split '.*images/train' holds no images"):
        load_data("imagefolder", root=str(tmp_path / "images"))
    with pytest.raises(ValueError, match="unknown data set 'mnist'; valid data sets: digits, procgen, atari, cifar10, imagefolder"):
        load_data("mnist")
    with pytest.raises(DataRootError, match=r"cifar10 data root '.*nowhere'"):
        run(tmp_path / "run", "data=cifar10", f"data.root={tmp_path / 'nowhere'}")


# ---------------------------------------------------------------- procgen frames and the bridge to the RL agents


def test_procgen_temporal_pairs_are_consecutive_frames_of_one_episode():
    data = load_data("procgen", games=["coinrun", "starpilot"], pairs="temporal", num_envs=2, steps=6, val_steps=2)
    train = data.train
    assert train.images.shape == (2 * 6 * 2, 3, 64, 64) and data.class_names == ["coinrun", "starpilot"]
    # frame t of env e sits at t * num_envs + e; its positive is the same env's next frame
    assert torch.equal(train.positives - train.anchors, torch.full_like(train.anchors, 2))
    assert set(train.labels[train.anchors].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="unknown procgen pairs 'random'; valid: augment, temporal"):
        load_data("procgen", pairs="random")


def test_procgen_encoder_loads_into_minc_ppo_and_a_mismatch_fails_clearly(tmp_path):
    from minc_rl.agents import MincPPO
    from minc_rl.envs import make_vec_env

    run(
        tmp_path, "data=procgen", "data.games=[coinrun]", "data.num_envs=4", "data.steps=8",
        "data.val_steps=2", "data.pairs=temporal", "batch_size=16", "steps=2", "eval.at_start=false",
    )
    saved = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert saved["name"] == "impala" and saved["input_shape"] == [3, 64, 64]
    env = make_vec_env("procgen:coinrun", 2)
    try:
        agent = MincPPO("CnnPolicy", env, aux="minc", encoder="impala", n_steps=16, batch_size=32, device="cpu")
        agent.load_pretrained_encoder(str(tmp_path / "encoder.pt"))
        for name, value in agent.aux_extractor.encoder.state_dict().items():
            torch.testing.assert_close(value, saved["state_dict"][name])
        nature = MincPPO("CnnPolicy", env, aux="minc", encoder="nature", n_steps=16, batch_size=32, device="cpu")
        with pytest.raises(ValueError, match=r"holds .*\('impala', \[3, 64, 64\], 256\).*is \('nature'"):
            nature.load_pretrained_encoder(str(tmp_path / "encoder.pt"))
    finally:
        env.close()


# ---------------------------------------------------------------- torchrun DDP (gloo, 2 CPU processes)


def test_torchrun_two_processes_gloo_lambda_identical_and_one_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "minc_rl.pretrain", "device=cpu", "progress=false", "batch_size=64", "steps=6",
        "eval.at_start=false", f"hydra.run.dir={out}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["lambda_rank_max_abs_diff"] == 0.0
    assert sorted(p.name for p in tmp_path.rglob("*.pt")) == ["checkpoint.pt", "encoder.pt"]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [6]  # 1437 images / 2 ranks / 32 per rank = 22 steps per epoch
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert int(checkpoint["loss"]["steps"]) == 6 and torch.isfinite(checkpoint["loss"]["ema_sum"]).all()


# ---------------------------------------------------------------- building blocks against hand-derived values


def test_lars_step_matches_the_hand_computed_update():
    weight = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    bias = nn.Parameter(torch.tensor([1.0, -1.0]))
    weight.grad, bias.grad = torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([0.5, 0.5])
    optimizer = LARS([weight, bias], lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.01)
    optimizer.step()
    update = torch.tensor([[1.5, 1.0], [0.0, 2.0]])  # grad + wd * w
    trust = 0.01 * 5.0 / update.norm()  # eta ||w|| / ||update||
    torch.testing.assert_close(weight.detach(), torch.tensor([[3.0, 0.0], [0.0, 4.0]]) - 0.1 * trust * update)
    torch.testing.assert_close(bias.detach(), torch.tensor([0.95, -1.05]))  # plain SGD for 1-D parameters
    weight.grad, bias.grad = torch.zeros(2, 2), torch.zeros(2)
    before = bias.detach().clone()
    optimizer.step()
    torch.testing.assert_close(bias.detach(), before - 0.1 * 0.9 * torch.tensor([0.5, 0.5]))  # momentum


def test_lr_scales_with_the_global_batch():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.3, 64, "sqrt") == pytest.approx(0.15)
    assert scaled_lr(0.3, 64, "none") == 0.3


def test_weighted_knn_matches_hand_computed_votes():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[0.6, 0.8]])
    # k=3: neighbours (0.6,0.8) sim 1 label 1, (0.8,0.6) sim .96 label 0, (0,1) sim .8 label 1
    # votes: class 1 = e^10 + e^8, class 0 = e^9.6 -> class 1
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=0.1) == 1.0
    # k=2: e^10 (class 1) vs e^9.6 (class 0) -> class 1; with the third neighbour of class 0 instead it flips
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=2, temperature=0.1) == 1.0
    # (0, 1) relabelled 0: at temperature 0.1 one e^10 (class 1) still beats e^9.6 + e^8 (class 0);
    # at temperature 1 the two votes e^0.96 + e^0.8 beat e^1: the temperature is applied
    flipped = torch.tensor([0, 0, 0, 1])
    assert knn_accuracy(train, flipped, query, torch.tensor([1]), k=3, temperature=0.1) == 1.0
    assert knn_accuracy(train, flipped, query, torch.tensor([0]), k=3, temperature=1.0) == 1.0
    # k is capped at the train-set size
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=200) == 1.0


def test_linear_probe_separates_separable_features_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=generator)
    y = (x[:, 0] > 0).long()
    assert linear_probe_accuracy(x[:100], y[:100], x[100:], y[100:]) > 0.95
    noise = torch.randn(200, 5, generator=generator)
    assert linear_probe_accuracy(noise[:100], y[:100], noise[100:], y[100:]) < 0.7


def test_simclr_augmentation_is_per_sample_and_scaled_to_the_image():
    torch.manual_seed(0)
    augment = TwoViewAugment("simclr", 32, 3, blur=[1.0, 0.1], solarize=[0.0, 0.2])
    images = torch.rand(1, 3, 32, 32).expand(8, 3, 32, 32).contiguous()
    a, b = augment(images, images)
    assert a.shape == b.shape == images.shape and 0 <= a.min() and a.max() <= 1
    assert len({tuple(v.flatten()[:16].tolist()) for v in a}) == 8  # every sample got its own parameters
    big = simclr_pipeline(224, 3, blur=1.0)
    blur = [op for op in big if type(op).__name__ == "RandomGaussianBlur"][0]
    assert blur.flags["kernel_size"] == 23  # ~10% of the side, odd
    small = simclr_pipeline(8, 1, blur=1.0)  # no blur below 16 pixels; no saturation/hue/grayscale on 1 channel
    assert [type(op).__name__ for op in small] == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter"]
    shifted, _ = TwoViewAugment("shift", 64, 3)(images[:, :, :8, :8].repeat(1, 1, 8, 8), images)
    assert shifted.shape == (8, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown augmentation 'cutout'; valid: simclr, shift, none"):
        TwoViewAugment("cutout", 32, 3)


def test_resnet_without_torchvision_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ImportError, match=r"install the `vision` extra: pip install 'minc-rl\[vision\]'"):
        build_backbone("resnet18", (3, 32, 32))
    assert build_backbone("impala", (3, 64, 64)).features_dim == 256  # the rest works without it
    assert build_encoder("nature", (3, 84, 84)).features_dim == 512


@pytest.mark.parametrize(("contents", "message"), [
    (b"hello", r"not a torch file written by minc_rl.pretrain \(\w+: "),
    ("state_dict", r"not an encoder.pt: it holds \['net.1.bias', .*\], an encoder.pt holds \['name', 'input_shape', "
                   r"'features_dim', 'state_dict'\]"),  # a bare state dict was a KeyError: 'name'
])
def test_loading_a_file_that_is_no_encoder_pt_says_what_it_holds(tmp_path, contents, message):
    encoder, path = build_encoder("mlp", (8,)), tmp_path / "encoder.pt"
    if contents == "state_dict":
        torch.save(encoder.state_dict(), path)
    else:
        path.write_bytes(contents)
    with pytest.raises(ValueError, match=rf"encoder file {path}: {message}"):
        load_encoder_weights(str(path), encoder, "mlp", (8,))


@pytest.mark.parametrize(("name", "shape", "message"), [
    ("nature", (84, 84, 4), r"encoder 'nature' takes channel-first images \(C, H, W\); \(84, 84, 4\) looks channel-last: "
                            r"give \(4, 84, 84\)"),  # it said the images were 84x4, too small
    ("minatar", (4, 2, 2), r"encoder 'minatar' needs images of at least 3x3; the observations are 2x2"),  # a torch error
])
def test_images_the_encoder_cannot_read_are_refused_with_the_fix(name, shape, message):
    with pytest.raises(ValueError, match=message):
        build_encoder(name, shape)


@pytest.mark.parametrize("features_dim", [0, -1, 2.5, True])
def test_a_bad_features_dim_is_refused_not_read_as_the_default(features_dim):
    with pytest.raises(ValueError, match=rf"features_dim must be an integer >= 1; got {features_dim!r}"):
        build_encoder("mlp", (8,), features_dim=features_dim)


# ---------------------------------------------------------------- the config folder from a built wheel


@pytest.mark.slow
def test_pretrain_configs_resolve_from_the_built_wheel(installed):
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(installed)!r})\n"
        "from minc_rl.configs import config_dir\n"
        "from minc_rl.ssl.pretraining import compose_config\n"
        "cfg = compose_config(['data=procgen', 'loss=spectral'])\n"
        "print(json.dumps({'dir': str(config_dir('pretrain')), 'backbone': cfg.backbone, 'mu': cfg.loss.mu}))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["dir"]).is_relative_to(installed.resolve()) and (Path(found["dir"]) / "config.yaml").is_file()
    assert found["backbone"] == "impala" and found["mu"] == 1.0
