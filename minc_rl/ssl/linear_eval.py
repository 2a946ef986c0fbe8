"""Evaluation of frozen backbones: fast linear probe and weighted kNN, and the paper's linear evaluation (the body
of `python -m minc_rl.linear_eval`, whose entry point checks the command line, then calls `run`).

    python -m minc_rl.linear_eval checkpoint=runs/pretrain/<run>/checkpoint.pt [data.root=...] [epochs=90]
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from minc_rl.common.checks import one_line
from minc_rl.common.cli import fail
from minc_rl.common.io import atomic_write
from minc_rl.ssl.backbones import build_backbone
from minc_rl.ssl.data import collate_pairs, load_data, to_float

PROGRAM = "minc_rl.linear_eval"
# what minc_rl.pretrain's save_checkpoint writes
CHECKPOINT_KEYS = ("config", "input_shape", "epoch", "step", "skipped", "model", "target", "loss", "optimizer", "scheduler")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available (the LOCAL_RANK-th GPU under torchrun), else cpu; other names as given, and
    ValueError for a CUDA device this torch cannot reach."""
    if name == "auto":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device; choose auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}, but this torch ({torch.__version__}) sees no CUDA device; use device=cpu "
                         "or device=auto")
    return device


def center_crop(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The central size x size (or (height, width)) window of (N, C, H, W) images."""
    crop_height, crop_width = (size, size) if isinstance(size, int) else size
    height, width = images.shape[-2:]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return images[..., top : top + crop_height, left : left + crop_width]


def subsample(dataset: Dataset, max_samples: int | None, seed: int = 0) -> Dataset:
    """A fixed random subset of at most `max_samples` items (the whole set when None or larger)."""
    if max_samples is None or len(dataset) <= max_samples:
        return dataset
    generator = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:max_samples].tolist())


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    image_size: int | tuple[int, int],
    device: torch.device,
    batch_size: int = 512,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of `model` (in eval mode) on the un-augmented, centre-cropped images of `dataset`, with labels."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_pairs, num_workers=num_workers)
    features, labels = [], []
    for images, _, y in loader:
        x = center_crop(to_float(images.to(device, non_blocking=True)), image_size)
        features.append(model(x).float())
        labels.append(y.to(device))
    model.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Weighted kNN top-1 (Wu et al. 2018, as in MoCo/solo-learn): cosine neighbours vote with exp(sim / temperature)."""
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    k = min(k, len(train_labels))
    bank = F.normalize(train_features.float(), dim=1)
    correct = 0
    for start in range(0, len(val_labels), chunk):
        query = F.normalize(val_features[start : start + chunk].float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        correct += int((votes.argmax(1) == val_labels[start : start + chunk]).sum())
    return correct / len(val_labels)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    iterations: int = 200,
) -> float:
    """Top-1 of multinomial logistic regression on standardised frozen features (full-batch L-BFGS, L2 penalty)."""
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    train_x, val_x = (train_features - mean) / std, (val_features - mean) / std
    classifier = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    nn.init.zeros_(classifier.weight)  # the problem is convex: a fixed start makes the probe deterministic
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(train_x), train_labels) + weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float((classifier(val_x).argmax(1) == val_labels).float().mean())


def all_finite(tensors: Any) -> bool:
    """Whether every floating-point tensor among `tensors` is finite."""
    return all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A pretraining checkpoint (a `checkpoint.pt` file or the run folder holding one) on the CPU, unchecked."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no pretraining checkpoint at {str(path)!r}")
    return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """A pretraining checkpoint (or its run dir), checked: a torch file with every key minc_rl.pretrain writes and
    finite weights; ValueError (one line, `<key>=<path>: ...`, with what to give instead) otherwise."""
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError as error:
        raise ValueError(f"{key}={path}: {error}; give a checkpoint.pt of minc_rl.pretrain or its run dir") from None
    except Exception as error:  # noqa: BLE001  a truncated or foreign file raises anything
        file = Path(path).expanduser()
        if zipfile.is_zipfile(file) and "policy.pth" in zipfile.ZipFile(file).namelist():
            raise ValueError(f"{key}={path} is an SB3 agent (a minc_rl.train checkpoint); give a checkpoint.pt of "
                             "minc_rl.pretrain (or its run dir)") from None
        raise ValueError(f"{key}={path}: not a readable pretraining checkpoint ({one_line(error)}); "
                         "give another checkpoint.pt or start a new run") from None  # fmt: skip
    if isinstance(checkpoint, dict) and {"name", "input_shape", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{key}={path} is an encoder.pt (the backbone's weights alone); give the checkpoint.pt of "
                         "its pretraining run (or the run dir)")
    missing = sorted(set(CHECKPOINT_KEYS) - set(checkpoint)) if isinstance(checkpoint, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise ValueError(f"{key}={path}: not a pretraining checkpoint of minc_rl.pretrain (it lacks {', '.join(missing)})")
    if not all_finite([*checkpoint["model"].values(), *checkpoint["loss"].values()]):
        raise ValueError(f"{key}={path}: the checkpoint's weights or Lambda are not finite")
    return checkpoint


def backbone_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """The pretrained backbone stored in a checkpoint, rebuilt from its config."""
    cfg = checkpoint["config"]
    backbone = build_backbone(cfg["backbone"], checkpoint["input_shape"], cfg.get("features_dim"))
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in checkpoint["model"].items() if k.startswith(prefix)})
    return backbone


def linear_evaluation(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train a linear classifier on the frozen backbone with SGD on crop/flip-augmented images; top-1 on val.

    With `feature_bn` the classifier sees BatchNorm-standardised features (no affine parameters), as in MAE.
    """
    checkpoint = read_checkpoint(cfg.checkpoint, "checkpoint")
    data_cfg = dict(checkpoint["config"]["data"])
    data_cfg.update({k: v for k, v in OmegaConf.to_container(cfg.data).items() if v is not None})
    data = load_data(data_cfg.pop("name"), **data_cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = backbone_from_checkpoint(checkpoint).to(device).eval().requires_grad_(False)
    image_size = tuple(int(side) for side in checkpoint["input_shape"][1:])  # (height, width): Atari's are 210x160
    classifier = nn.Linear(backbone.features_dim, data.num_classes)
    if cfg.feature_bn:  # MAE's linear probe: a parameter-free BN standardises the features (still a linear map)
        classifier = nn.Sequential(nn.BatchNorm1d(backbone.features_dim, affine=False), classifier)
    classifier = classifier.to(device)
    lr = cfg.lr * cfg.batch_size / 256
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
    )
    loader = DataLoader(
        data.train, batch_size=cfg.batch_size, shuffle=True, drop_last=len(data.train) > cfg.batch_size,
        collate_fn=collate_pairs, num_workers=cfg.num_workers,
    )
    total_steps = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    augment = nn.Sequential(
        K.RandomResizedCrop(image_size, scale=tuple(cfg.crop_scale)), K.RandomHorizontalFlip(p=cfg.flip)
    )
    start = time.time()
    for epoch in range(cfg.epochs):
        for images, _, labels in tqdm(loader, desc=f"linear eval {epoch + 1}/{cfg.epochs}", disable=not cfg.progress):
            with torch.no_grad():
                features = backbone(augment(to_float(images.to(device))))
            loss = F.cross_entropy(classifier(features), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    val_features, val_labels = extract_features(backbone, data.val, image_size, device, num_workers=cfg.num_workers)
    classifier.eval()
    with torch.no_grad():
        top1 = float((classifier(val_features).argmax(1) == val_labels).float().mean())
    result = {
        "checkpoint": str(cfg.checkpoint),
        "pretrain_epoch": int(checkpoint["epoch"]),
        "val_top1": top1,
        "epochs": int(cfg.epochs),
        "batch_size": int(cfg.batch_size),
        "lr": lr,
        "seconds": time.time() - start,
    }
    atomic_write(Path(out_dir) / "linear_eval.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    print(json.dumps(result, indent=2))
    return result


def run(cfg: DictConfig, out_dir: str) -> None:
    """`python -m minc_rl.linear_eval`'s run in Hydra's run dir `out_dir`; a bad checkpoint, data root or option is
    one line and exit code 2."""
    try:
        linear_evaluation(cfg, out_dir)
    except (ValueError, ImportError) as error:
        fail(PROGRAM, str(error).strip().splitlines()[0])
