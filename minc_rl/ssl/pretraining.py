"""Image self-supervised pretraining with MINC (or SCL / InfoNCE) on two views, or latent self-prediction along a
random agent's actions (loss=selfpred, data=atari), with probe/kNN evaluation and DDP: the body of
`python -m minc_rl.pretrain` (the entry point checks the command line, then calls `run`), and `pretrain(cfg, out_dir)`
for scripts.

    python -m minc_rl.pretrain data=digits loss=minc
    torchrun --nproc_per_node=4 -m minc_rl.pretrain data=cifar10 data.root=/data/cifar backbone=resnet18
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from stable_baselines3.common.utils import polyak_update
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from minc_rl.ssl.augment import TwoViewAugment
from minc_rl.ssl.backbones import build_backbone
from minc_rl.common.checks import check_bool, check_choice, check_fraction, check_int, check_nonnegative, check_positive
from minc_rl.common.cli import fail
from minc_rl.configs import config_dir
from minc_rl.common.run_dir import RunDirError, RunLock, check_fresh, resume_argument, saved_config_with
from minc_rl.ssl.data import SSLData, collate_pairs, load_data, to_float
from minc_rl.ssl.encoders import ProjectionHead, save_encoder
from minc_rl.common.io import atomic_torch_save, atomic_write
from minc_rl.ssl.linear_eval import (
    all_finite,
    center_crop,
    extract_features,
    knn_accuracy,
    linear_probe_accuracy,
    read_checkpoint as read_pretraining_checkpoint,
    resolve_device,
    subsample,
)
from minc_rl.losses import build_aux_loss
from minc_rl.losses.latent import LATENT_LOSSES, LatentModel, build_latent_loss
from minc_rl.ssl.metrics import embedding_health, rankme
from minc_rl.common.run_dir import STOP_SIGNALS
from minc_rl.common.checks import one_line

PROGRAM = "minc_rl.pretrain"
OPTIMIZERS = ("sgd", "lars", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")
PRECISIONS = ("fp32", "bf16")
SELFPRED_TARGETS = ("online", "ema", "none")  # loss=selfpred: what embeds o_t+k (configs/pretrain/loss/selfpred.yaml)
EVAL_FIELDS = ("probe_acc", "knn_acc", "feature_rankme", "val_rankme", "val_embedding_std", "collapsed")
# The files that mark a directory as holding a pretraining run.
RUN_FILES = ("checkpoint.pt", "metrics.csv", "encoder.pt", "summary.json")
CSV_FIELDS = (
    "epoch", "step", "lr", "loss", "skipped_batches", "seconds", "images_per_s",
    "rankme", "embedding_std", "lambda_offdiag_ratio", "lambda_eig_max", "lambda_eig_min", *EVAL_FIELDS,
)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in SimCLR/BYOL: SGD momentum on the gradient scaled by eta ||w|| / ||g + wd w||.

    Biases and BatchNorm parameters (1-D tensors) get neither weight decay nor the trust ratio.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One LARS update of every parameter with a gradient."""
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    weight_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (weight_norm > 0) & (update_norm > 0), group["eta"] * weight_norm / update_norm, 1.0
                    )
                    update = update * trust
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss


class SSLModel(nn.Module):
    """Backbone followed by the BN-terminated projection head (loss=selfpred: no head, and the latent model)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, latent: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.latent = latent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of float images in [0, 1]."""
        return self.head(self.backbone(x))


def scaled_lr(base_lr: float, batch_size: int, scaling: str) -> float:
    """The learning rate for a global batch: base_lr * B / 256 (SimCLR), base_lr * sqrt(B / 256), or base_lr."""
    check_choice("lr_scaling", scaling, LR_SCALINGS)
    return base_lr * {"linear": batch_size / 256, "sqrt": math.sqrt(batch_size / 256), "none": 1.0}[scaling]


def build_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """SGD (momentum), LARS or AdamW."""
    check_choice("optimizer", name, OPTIMIZERS)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Per-step LR factor: linear warm-up over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the torchrun process group (nccl on GPUs, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_name)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


@torch.no_grad()
def evaluate(model: SSLModel, data: SSLData, cfg: DictConfig, image_size: int | tuple[int, int], device: torch.device) -> dict[str, Any]:
    """Linear probe and weighted kNN on frozen backbone features (held-out split), and collapse monitors."""
    train_set = subsample(data.train, cfg.eval.max_samples, cfg.seed)
    val_set = subsample(data.val, cfg.eval.max_samples, cfg.seed)
    train_f, train_y = extract_features(model.backbone, train_set, image_size, device, cfg.eval.batch_size, cfg.num_workers)
    val_f, val_y = extract_features(model.backbone, val_set, image_size, device, cfg.eval.batch_size, cfg.num_workers)
    if not (torch.isfinite(train_f).all() and torch.isfinite(val_f).all()):  # a diverged run: report, don't probe
        return {key: float("nan") for key in EVAL_FIELDS} | {"collapsed": 1}
    was_training = model.training
    model.eval()
    val_z = model.head(val_f)
    model.train(was_training)
    health = embedding_health(val_z)
    return {
        "probe_acc": linear_probe_accuracy(train_f, train_y, val_f, val_y, data.num_classes),
        "knn_acc": knn_accuracy(
            train_f, train_y, val_f, val_y, cfg.eval.knn_k, cfg.eval.knn_temperature, data.num_classes
        ),
        "feature_rankme": rankme(val_f),
        "val_rankme": health["rankme"],
        "val_embedding_std": health["embedding_std"],
        # held-out embeddings that are constant or one-dimensional have an effective rank below 2
        "collapsed": int(health["rankme"] < 2.0),
    }


class RunLog:
    """Rank-0 metrics: one CSV row per epoch (appended on resume), TensorBoard scalars, optional offline wandb."""

    def __init__(self, out_dir: Path, cfg: DictConfig, enabled: bool, keep_epochs: int | None = None) -> None:
        """keep_epochs (on resume): the rows of metrics.csv after that many epochs are dropped, since the resumed
        run writes them again."""
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.csv_path = out_dir / "metrics.csv"
        if keep_epochs is not None and self.csv_path.exists():
            rows = read_metrics(self.csv_path)
            kept = [row for row in rows if int(row["epoch"]) <= keep_epochs]
            atomic_write(self.csv_path, lambda tmp: write_metrics(tmp, kept))
        new = not self.csv_path.exists()
        self.csv_file = open(self.csv_path, "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            self.csv.writeheader()
        self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        self.wandb = None
        if cfg.wandb.enabled:
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(out_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
            )

    def log(self, row: dict[str, Any]) -> None:
        """Write one epoch's metrics everywhere."""
        if not self.enabled:
            return
        self.csv.writerow(row)
        self.csv_file.flush()
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, row["step"])
        self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def close(self) -> None:
        """Flush and close the writers."""
        if not self.enabled:
            return
        self.csv_file.close()
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of metrics.csv; ValueError (one line) if its columns are not CSV_FIELDS or an epoch is not a number."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise ValueError(f"{path} has other columns than minc_rl.pretrain writes; repair it or move it away, then resume")
        rows = list(reader)
    for row in rows:
        if not (row["epoch"] or "").isdigit():
            raise ValueError(f"{path} has a row with epoch={row['epoch']!r}; repair it or move it away, then resume")
    return rows


def write_metrics(path: str, rows: list[dict[str, str]]) -> None:
    """metrics.csv with `rows` under its header."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _validate(cfg: DictConfig, world: int) -> None:
    if cfg.steps is None:
        check_int("epochs", cfg.epochs, 1)  # epochs=0 would write the untrained encoder as if it were a result
    else:
        check_int("steps", cfg.steps, 1)
    check_choice("precision", cfg.precision, PRECISIONS)
    check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    check_choice("lr_scaling", cfg.lr_scaling, LR_SCALINGS)
    for key in ("lr", "eval.knn_temperature"):
        check_positive(key, OmegaConf.select(cfg, key))
    for key in ("weight_decay", "momentum"):
        check_nonnegative(key, OmegaConf.select(cfg, key))
    for key, low in (("warmup_epochs", 0), ("num_workers", 0), ("checkpoint_every", 1), ("eval.every", 1),
                     ("eval.knn_k", 1), ("eval.batch_size", 1), ("eval.max_samples", 1)):
        check_int(key, OmegaConf.select(cfg, key), low)
    for key in ("progress", "compile", "sync_bn", "eval.at_start"):
        check_bool(key, OmegaConf.select(cfg, key))
    check_int("batch_size", cfg.batch_size, 2)
    if cfg.batch_size % world:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by the {world} torchrun processes "
            "(every rank gets an equal share)"
        )
    if cfg.target_momentum is not None and not 0.0 <= cfg.target_momentum < 1.0:
        raise ValueError(f"target_momentum must be in [0, 1) or null; got {cfg.target_momentum!r}")
    if cfg.loss.name == "selfpred":
        _validate_selfpred(cfg, world)


def _validate_selfpred(cfg: DictConfig, world: int) -> None:
    """loss=selfpred's options, and the data (with actions) and single process it needs."""
    if cfg.data.name != "atari":
        raise ValueError(f"loss=selfpred rolls its latent model along the data's actions: it needs data=atari; "
                         f"data={cfg.data.name} has no actions")
    if world > 1:
        raise ValueError(f"loss=selfpred runs in one process (its latent model and latent loss are not synchronised "
                         f"across ranks); got {world} torchrun processes: run it with python -m minc_rl.pretrain")
    check_int("loss.horizon", cfg.loss.horizon, 1)
    check_choice("loss.latent_loss", cfg.loss.latent_loss, LATENT_LOSSES)
    check_int("loss.hidden", cfg.loss.hidden, 1)
    check_int("loss.dim", cfg.loss.dim, 1)
    check_fraction("loss.ema", cfg.loss.ema)
    check_choice("loss.target", cfg.loss.target, SELFPRED_TARGETS)
    if (cfg.loss.target == "ema") != (cfg.target_momentum is not None):
        raise ValueError(f"loss.target={cfg.loss.target} and target_momentum={cfg.target_momentum}: an EMA target "
                         "needs its momentum (loss.target=ema with target_momentum in [0, 1), e.g. 0.99), and only it "
                         "takes one")


@dataclass
class Run:
    """Everything one pretraining run works with, built by setup_run() and advanced by train_epoch()."""

    cfg: DictConfig
    out_dir: Path
    rank: int
    world: int
    device: torch.device
    data: SSLData
    image_size: int | tuple[int, int]  # a square crop's side, or the whole image's (height, width)
    input_shape: tuple[int, int, int]
    model: SSLModel  # the module whose weights are saved; train_model wraps it (DDP, torch.compile)
    train_model: nn.Module
    target: SSLModel | None  # BYOL-style EMA copy (target_momentum) for the b view (selfpred: o_t+k), else None
    loss_fn: nn.Module
    augment: TwoViewAugment
    sampler: DistributedSampler
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: Callable[[int], float]
    lr: float
    total_steps: int
    epochs: int
    lock: RunLock | None = None  # rank 0 holds out_dir alone
    start_epoch: int = 0
    step: int = 0
    skipped: int = 0
    resume_batches: int = 0  # batches of start_epoch done before a stop (skipped on resume)
    resume_rng: torch.Tensor | None = None  # torch's RNG state at that point (the augmentations continue exactly)
    batches_done: int = 0  # batches of the current epoch done
    stop: StopFlag = field(default_factory=lambda: StopFlag())
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0, which writes every file."""
        return self.rank == 0


class StopFlag:
    """Ctrl-C (SIGINT), SIGTERM or SIGUSR2 (SLURM's --signal) set `signum` while installed (a context manager); the
    training loop then stops after its current step and writes a checkpoint. A second signal acts as usual."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self.previous[signum])


def pretrain(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Pretrain a backbone on pairs of views; write config, metrics, checkpoints, encoder.pt and summary.json to out_dir.

    Runs single-process or under torchrun (one process per device); returns the summary. Ctrl-C, SIGTERM or SIGUSR2
    stop it after the current step with a checkpoint, encoder.pt and a summary whose `interrupted` is the signal's
    name (resume= continues from there).
    """
    run = setup_run(cfg, Path(out_dir))
    try:
        if cfg.resume:
            restore_checkpoint(run, cfg.resume)
        log = RunLog(run.out_dir, cfg, enabled=run.is_main, keep_epochs=run.start_epoch if cfg.resume else None)
        if run.is_main:  # only now: a bad checkpoint or metrics.csv leaves the run directory as it was
            atomic_write(run.out_dir / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))
        start_time = time.time()
        with run.stop:
            run_epochs(run, log)
        summary = finish(run, time.time() - start_time)
        log.close()
        barrier(run)
        return summary
    finally:
        if run.lock is not None:
            run.lock.release()


def run_epochs(run: Run, log: RunLog) -> None:
    """The evaluation of the random-init backbone, then the epochs with their evaluations and checkpoints; on a
    stop signal, a checkpoint of the step reached."""
    cfg = run.cfg
    if run.is_main and cfg.eval.at_start and run.start_epoch == 0 and run.resume_batches == 0:
        run.history.append({"epoch": 0, "step": 0, **evaluate(run.model, run.data, cfg, run.image_size, run.device)})
        log.log(run.history[-1])
    barrier(run)
    for epoch in range(run.start_epoch, run.epochs):
        if run.stop.signum is not None and run.world == 1:  # a signal during the evaluation
            save_checkpoint(run, epoch)
            return
        row = train_epoch(run, epoch)
        if run.stop.signum is not None:  # under DDP every rank has stopped at the same step (train_step)
            if run.is_main:
                save_checkpoint(run, epoch, run.batches_done)
            barrier(run)
            return
        last_epoch = epoch + 1 == run.epochs
        if run.is_main and ((epoch + 1) % cfg.eval.every == 0 or last_epoch):
            row.update(evaluate(run.model, run.data, cfg, run.image_size, run.device))
        if run.is_main:
            run.history.append(row)
            log.log(row)
            if (epoch + 1) % cfg.checkpoint_every == 0 or last_epoch:
                save_checkpoint(run, epoch + 1)
        barrier(run)


def barrier(run: Run) -> None:
    """Wait for every torchrun process (nothing to wait for in a single process)."""
    if run.world > 1:
        dist.barrier()


def setup_run(cfg: DictConfig, out_dir: Path) -> Run:
    """Check the options, claim out_dir (rank 0), load the data, and build the model, loss, augmentation, data loader,
    optimizer and LR schedule."""
    rank, world, device = setup_distributed(cfg.device)
    _validate(cfg, world)
    lock = None
    if rank == 0:
        try:
            lock = RunLock(out_dir).acquire()
            if not cfg.resume:
                check_fresh(out_dir, RUN_FILES, resume_argument(out_dir))
        except RunDirError as error:
            if lock is not None:
                lock.release()
            raise ValueError(str(error)) from None
    data, image_size, input_shape = load_images(cfg)
    actions = None if data.sequences is None else data.sequences.num_actions
    model, loss_fn, target = build_ssl_model(cfg, input_shape, world, device, actions)
    augment = TwoViewAugment(image_size=image_size, channels=input_shape[0], **OmegaConf.to_container(cfg.augment))
    train_set = data.train if data.sequences is None else data.sequences
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(
        train_set, batch_size=cfg.batch_size // world, sampler=sampler, drop_last=True, collate_fn=collate_pairs,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0,
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={cfg.batch_size} is larger than the {len(train_set)} training pairs of data {cfg.data.name!r}"
        )
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    # the losses' parameters too: SPR's projection and predictor for loss=selfpred loss.latent_loss=cosine
    optimizer = build_optimizer(cfg.optimizer, [*model.parameters(), *loss_fn.parameters()], lr, cfg.weight_decay,
                                cfg.momentum)
    schedule = warmup_cosine(cfg.warmup_epochs * steps_per_epoch, total_steps)
    train_model: nn.Module = model
    if world > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return Run(
        cfg=cfg, out_dir=out_dir, rank=rank, world=world, device=device, data=data, image_size=image_size,
        input_shape=input_shape, model=model, train_model=train_model, target=target, loss_fn=loss_fn,
        augment=augment.to(device), sampler=sampler, loader=loader, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), schedule=schedule, lr=lr,
        total_steps=total_steps, epochs=math.ceil(total_steps / steps_per_epoch), lock=lock,
    )  # fmt: skip


def load_images(cfg: DictConfig) -> tuple[SSLData, int | tuple[int, int], tuple[int, int, int]]:
    """The data set of cfg.data, the side of the square crops the model sees (data.image_size; null: the whole
    image, as (height, width)), and the model's input shape."""
    data_options = OmegaConf.to_container(cfg.data, resolve=True)
    image_size = data_options.pop("image_size")
    if cfg.loss.name == "selfpred":
        data_options["horizon"] = cfg.loss.horizon
    data = load_data(data_options.pop("name"), **data_options)
    channels, height, width = data.input_shape
    if image_size is None:  # the whole image, square or not (Atari's 210x160 frames)
        return data, (height, width), data.input_shape
    image_size = int(image_size)
    if min(height, width) < image_size:
        raise ValueError(f"data.image_size={image_size} is larger than the {height}x{width} images of data {cfg.data.name!r}")
    return data, image_size, (channels, image_size, image_size)


def build_ssl_model(
    cfg: DictConfig, input_shape: tuple[int, int, int], world: int, device: torch.device, actions: int | None = None
) -> tuple[SSLModel, nn.Module, SSLModel | None]:
    """Backbone + projection head (identical initial weights on every rank), the loss, and the EMA target copy; for
    loss=selfpred the backbone's features are the latent (the probe reads them): no head, and the latent model over
    `actions` actions with the agents' latent loss (minc_rl.losses.latent)."""
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone, input_shape, cfg.features_dim)
    if cfg.loss.name == "selfpred":
        latent = LatentModel(backbone.features_dim, actions, cfg.loss.hidden, reward=False)  # frames without rewards
        model = SSLModel(backbone, nn.Identity(), latent).to(device)
        loss_fn = build_latent_loss(cfg.loss.latent_loss, backbone.features_dim, cfg.loss.dim, cfg.loss.ema,
                                    target_has_gradient=cfg.loss.target == "none")
    else:
        head = ProjectionHead(backbone.features_dim, cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.final_bn)
        model = SSLModel(backbone, head).to(device)
        loss_options = OmegaConf.to_container(cfg.loss, resolve=True)
        loss_fn = build_aux_loss(loss_options.pop("name"), head.out_dim, gather_distributed=world > 1, **loss_options)
    if world > 1 and cfg.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    target = None if cfg.target_momentum is None else copy.deepcopy(model).requires_grad_(False)
    return model, loss_fn.to(device), target


def restore_checkpoint(run: Run, path: str | Path) -> None:
    """Continue from a checkpoint of the same networks (backbone, input shape, loss, features, head, EMA target or
    none): weights, Lambda, optimizer, schedule."""
    cfg = run.cfg
    checkpoint = read_checkpoint(path)
    saved = checkpoint["config"]
    found = (saved["backbone"], list(checkpoint["input_shape"]), saved["loss"]["name"])
    expected = (cfg.backbone, list(run.input_shape), cfg.loss.name)
    if found != expected:
        raise ValueError(f"resume={path}: checkpoint has (backbone, input_shape, loss) = {found}, this run {expected}")
    built = {"features_dim": saved.get("features_dim"), "head": saved.get("head"),
             "an EMA target": saved.get("target_momentum") is not None}
    wanted = {"features_dim": cfg.features_dim, "head": OmegaConf.to_container(cfg.head),
              "an EMA target": cfg.target_momentum is not None}
    for key, value in built.items():
        if value != wanted[key]:
            raise ValueError(f"resume={path}: the checkpoint's networks were built with {key}: {value}; this run asks "
                             f"for {wanted[key]}")
    run.model.load_state_dict(checkpoint["model"])
    run.loss_fn.load_state_dict(checkpoint["loss"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.target is not None:
        run.target.load_state_dict(checkpoint["target"])
    run.start_epoch, run.step, run.skipped = checkpoint["epoch"], checkpoint["step"], checkpoint["skipped"]
    run.resume_batches, run.resume_rng = checkpoint.get("batches_done", 0), checkpoint.get("rng")
    for group, base_lr in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
        group["lr"] = base_lr * run.schedule(run.step)  # this run's schedule, not the one saved with the checkpoint


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A pretraining checkpoint to resume (or its run dir), checked; ValueError (one line) otherwise."""
    return read_pretraining_checkpoint(path, "resume")


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass over the loader (cut at run.total_steps); returns the epoch's metrics row."""
    cfg = run.cfg
    run.sampler.set_epoch(epoch)
    torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + run.rank)  # augmentations: per rank, reproducible on resume
    run.model.train()
    epoch_start, losses, embeddings = time.time(), [], None
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{run.epochs}", disable=not (run.is_main and cfg.progress), leave=False)
    batches = iter(bar)
    run.batches_done = 0
    if epoch == run.start_epoch and run.resume_batches:  # continue a stopped epoch: the batches it did are skipped
        for _ in range(run.resume_batches):
            next(batches)
        run.batches_done = run.resume_batches
        if run.resume_rng is not None:
            torch.set_rng_state(run.resume_rng)
    for batch in batches:
        if run.step >= run.total_steps:
            break
        loss, embeddings = train_step(run, batch)
        if loss is not None:
            losses.append(loss)
        run.step += 1
        run.batches_done += 1
        bar.set_postfix(loss=f"{losses[-1]:.4f}" if losses else "nan")
        if run.stop.signum is not None:
            break
    bar.close()
    seconds = time.time() - epoch_start
    return {
        **(embedding_health(embeddings, run.loss_fn) if embeddings is not None else {}),  # the last batch's
        "epoch": epoch + 1, "step": run.step, "lr": run.optimizer.param_groups[0]["lr"],
        "loss": sum(losses) / len(losses) if losses else float("nan"), "skipped_batches": run.skipped,
        "seconds": seconds, "images_per_s": len(losses) * cfg.batch_size / max(seconds, 1e-9),
    }  # fmt: skip


def train_step(run: Run, batch: tuple[torch.Tensor, ...]) -> tuple[float | None, torch.Tensor]:
    """One optimizer step on a batch of pairs, or of sequences for loss=selfpred (skipped on every rank when the loss
    is not finite); returns the loss (None when skipped) and the batch's a-view embeddings (selfpred: o_t's
    features)."""
    loss, a = selfpred_loss(run, *batch) if run.cfg.loss.name == "selfpred" else pair_loss(run, *batch[:2])
    flags = torch.stack([torch.isfinite(loss.detach()).float().cpu(), torch.tensor(float(run.stop.signum is None))])
    if run.world > 1:
        flags = flags.to(run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # every rank skips together, and stops together
        if flags[1].item() == 0.0 and run.stop.signum is None:
            run.stop.signum = signal.SIGTERM  # another rank was stopped
    value = None
    if flags[0].item() == 1.0:
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        value = float(loss.detach())
        if run.target is not None:
            ema_update(run.model, run.target, run.cfg.target_momentum)
    else:
        run.skipped += 1
    run.scheduler.step()
    return value, a.detach()


def pair_loss(run: Run, raw_images: torch.Tensor, raw_positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a batch of pairs (two augmented views, the b view through the target if there is one) and the a
    views' embeddings."""
    images = to_float(raw_images.to(run.device, non_blocking=True))
    positives = images if raw_positives is raw_images else to_float(raw_positives.to(run.device, non_blocking=True))
    view_a, view_b = (center_crop(v, run.image_size) for v in run.augment(images, positives))
    with torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=run.cfg.precision == "bf16"):
        a = run.train_model(torch.cat([view_a, view_b]))
        if run.target is None:
            a, b = a.chunk(2)
        else:
            with torch.no_grad():
                b = run.target(torch.cat([view_b, view_a]))
        loss = run.loss_fn(a, b)
    return loss, a


def selfpred_loss(
    run: Run, raw_images: torch.Tensor, actions: torch.Tensor, raw_successors: torch.Tensor, held: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent self-prediction on a batch of sequences (data.SequenceDataset), as the agents' aux=selfpred without
    rewards: the latent model rolled out K steps from o_t's features along a_t..a_t+K-1, each prediction against the
    target's embedding of o_t+k where held (and of o_t itself, k = 0, under an EMA target, as the agents'); the
    target is the online network under stop-gradient (loss.target=online), its EMA copy (ema) or the online network
    with gradient (none). Returns the loss and o_t's features."""
    kind = run.cfg.loss.target
    images = to_float(raw_images.to(run.device, non_blocking=True))
    successors = to_float(raw_successors[held].to(run.device, non_blocking=True))  # the held o_t+k only: (n, C, H, W)
    held = held.to(run.device, non_blocking=True)
    with torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=run.cfg.precision == "bf16"):
        features = run.train_model(images)
        predictions = run.model.latent.rollout(features, actions.to(run.device, non_blocking=True))[held]
        if kind == "none":
            targets = run.train_model(successors)
        elif kind == "online":
            with torch.no_grad():
                targets = run.train_model(successors)
        else:
            with torch.no_grad():
                targets = run.target(torch.cat([images, successors]))
            predictions = torch.cat([features, predictions])
        loss = run.loss_fn(predictions, targets)
    return loss, features


def ema_update(model: nn.Module, target: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * model for every floating-point tensor (weights and BatchNorm
    statistics, SB3's polyak_update, as the agents' target encoders); integer buffers are copied."""
    pairs = list(zip(model.state_dict().values(), target.state_dict().values()))
    floats = [(online, ema) for online, ema in pairs if ema.is_floating_point()]
    polyak_update([online for online, _ in floats], [ema for _, ema in floats], 1.0 - momentum)
    with torch.no_grad():
        for online, ema in pairs:
            if not ema.is_floating_point():
                ema.copy_(online)


def save_checkpoint(run: Run, epochs_done: int, batches_done: int = 0) -> None:
    """checkpoint.pt (atomic): the config, weights, Lambda, optimizer and schedule; never a non-finite model. A run
    stopped inside an epoch also saves how many of its batches it did and torch's RNG state."""
    state = {
        "config": OmegaConf.to_container(run.cfg, resolve=True), "input_shape": list(run.input_shape),
        "epoch": epochs_done, "batches_done": batches_done, "rng": torch.get_rng_state() if batches_done else None,
        "step": run.step, "skipped": run.skipped, "model": run.model.state_dict(),
        "target": None if run.target is None else run.target.state_dict(), "loss": run.loss_fn.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
    }  # fmt: skip
    if not all_finite([*state["model"].values(), *state["loss"].values()]):
        raise FloatingPointError(f"non-finite weights or Lambda at epoch {epochs_done}; checkpoint not written")
    try:
        atomic_torch_save(state, run.out_dir / "checkpoint.pt")
    except (OSError, RuntimeError) as error:  # a full disk: torch says "unexpected pos ..." (the old file is intact)
        raise CheckpointWriteError(f"could not write {run.out_dir / 'checkpoint.pt'} ({one_line(error)}); the "
                                   "previous checkpoint is intact: free disk space, then resume") from None


def finish(run: Run, seconds: float) -> dict[str, Any]:
    """encoder.pt and summary.json (rank 0; the summary is {} on the other ranks), with the largest difference
    between the ranks' Lambdas under DDP."""
    cfg = run.cfg
    lambda_rank_diff = None
    cov = getattr(run.loss_fn, "cov", None)
    if run.world > 1 and cov is not None:
        covs = [torch.empty_like(cov) for _ in range(run.world)]
        dist.all_gather(covs, cov.contiguous())
        lambda_rank_diff = max(float((c - covs[0]).abs().max()) for c in covs)
    if not run.is_main:
        return {}
    save_encoder(str(run.out_dir / "encoder.pt"), run.model.backbone, cfg.backbone, run.input_shape)
    evaluations = [h for h in run.history if "probe_acc" in h]
    summary = {
        "data": cfg.data.name, "loss": cfg.loss.name, "backbone": cfg.backbone,
        "batch_size": cfg.batch_size, "world_size": run.world, "epochs": run.epochs, "steps": run.step,
        "lr": run.lr, "seconds": seconds, "skipped_batches": run.skipped,
        "initial": evaluations[0] if cfg.eval.at_start and run.start_epoch == 0 else None,
        "final": evaluations[-1] if evaluations else None,
        "lambda_rank_max_abs_diff": lambda_rank_diff,
        "interrupted": None if run.stop.signum is None else signal.Signals(run.stop.signum).name,
    }  # fmt: skip
    atomic_write(run.out_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    return summary


def resumed_pretrain_config(resume: str, out_dir: Path, overrides: list[str]) -> DictConfig:
    """The settings the checkpoint's run had, with the command line's key=value overrides on top (as training's
    resume=): a 60-epoch run resumes as one. The run continues in the checkpoint's own directory."""
    checkpoint_dir = Path(resume).parent if str(resume).endswith(".pt") else Path(resume)
    saved = OmegaConf.create(read_checkpoint(resume)["config"])
    if out_dir.resolve() != checkpoint_dir.resolve():
        raise ValueError(f"resume={resume} continues in {checkpoint_dir}, where its metrics are; drop "
                         f"hydra.run.dir={out_dir}, or copy the run directory there first")
    cfg = saved_config_with(saved, checkpoint_dir, overrides, FIXED_ON_RESUME)
    cfg.resume = resume
    return cfg


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The pretraining config with Hydra overrides, as the command line builds it (for scripts and tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config_dir("pretrain")), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# what resume= cannot change (the checkpoint holds these networks) -> where config.yaml keeps it; loss.* for
# selfpred; whether there is an EMA target (target_momentum null or not) is checked by restore_checkpoint
FIXED_ON_RESUME = {"data": "data.name", "loss": "loss.name", "backbone": "backbone",
                   **{key: key for key in ("features_dim", "head.out_dim", "head.hidden_dim", "head.final_bn",
                                           "loss.latent_loss", "loss.hidden", "loss.dim", "loss.target")}}


class CheckpointWriteError(RuntimeError):
    """The checkpoint could not be written (a full disk); the message is one line for the user."""


def error_line(error: BaseException) -> str:
    """An error's message as one line; for one a DataLoader worker raised (torch re-raises it as 'Caught <type> in
    DataLoader worker process <n>.' and the worker's traceback), the message the worker's error had."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    if "in DataLoader worker process" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return lines[0]


def run(cfg: DictConfig, out_dir: str) -> None:
    """`python -m minc_rl.pretrain`'s run (or one torchrun process of it) in Hydra's run dir `out_dir`: a bad option,
    data root, checkpoint or run dir is one line and exit code 2, a checkpoint that cannot be written exit code 1,
    a stop by a signal 128 + its number (after checkpoint.pt and encoder.pt are written)."""
    from hydra.core.hydra_config import HydraConfig

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        setup_distributed(cfg.device)
        shared = [out_dir]
        dist.broadcast_object_list(shared, src=0)  # ranks may resolve ${now:} a second apart: use rank 0's folder
        if shared[0] != out_dir and Path(out_dir).is_dir() and not any(Path(out_dir).iterdir()):
            Path(out_dir).rmdir()
        out_dir = shared[0]
    try:
        if cfg.resume:
            cfg = resumed_pretrain_config(cfg.resume, Path(out_dir), list(HydraConfig.get().overrides.task))
        summary = pretrain(cfg, out_dir)
    except (ValueError, RunDirError, ImportError) as error:  # a bad option, data root, checkpoint, run dir or extra
        fail(PROGRAM, error_line(error))
    except CheckpointWriteError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if summary:
        print(json.dumps({"out_dir": str(out_dir), "final": summary["final"]}, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    if summary.get("interrupted"):
        print(f"minc_rl.pretrain: interrupted ({summary['interrupted']}) at step {summary['steps']}; checkpoint.pt and "
              f"encoder.pt written; continue with: python -m minc_rl.pretrain {resume_argument(out_dir)}", flush=True)  # fmt: skip
        raise SystemExit(128 + signal.Signals[summary["interrupted"]])

