"""Encoders shared by the RL agents and image pretraining, and the BN-terminated projection head."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minc_rl.common.checks import check_int, one_line
from minc_rl.common.io import atomic_torch_save

ENCODERS = ("impala", "nature", "minatar", "mlp")
ENCODER_FILE_KEYS = ("name", "input_shape", "features_dim", "state_dict")  # save_encoder's
NATURE_MIN_SIZE = 36  # smallest image side the Nature CNN's 8/4, 4/2, 3/1 convolutions accept


class _ResidualBlock(nn.Module):
    """x + conv1(relu(conv0(relu(x)))); the ReLUs are modules so that hooks (minc_rl.rl.health) see them."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.relu0 = nn.ReLU()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(self.relu1(self.conv0(self.relu0(x))))


class ImpalaCNN(nn.Module):
    """IMPALA CNN (Espeholt et al. 2018) as used by Cobbe et al. 2020: stacks of conv, pool, 2 residual blocks."""

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int] = (64, 64),
        channels: Sequence[int] = (16, 32, 32),
        features_dim: int = 256,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for previous, out in zip((in_channels, *channels), channels):
            layers += [
                nn.Conv2d(previous, out, 3, padding=1),
                nn.MaxPool2d(3, stride=2, padding=1),
                _ResidualBlock(out),
                _ResidualBlock(out),
            ]
        self.conv = nn.Sequential(*layers, nn.ReLU(), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(flat_size(self.conv, in_channels, image_size), features_dim), nn.ReLU())
        self.features_dim = features_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of float images (N, C, H, W) in [0, 1]."""
        return self.fc(self.conv(x))


class NatureCNN(nn.Module):
    """Nature DQN CNN (Mnih et al. 2015): three convolutions and a linear layer."""

    def __init__(self, in_channels: int, image_size: tuple[int, int] = (84, 84), features_dim: int = 512) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(flat_size(self.conv, in_channels, image_size), features_dim), nn.ReLU())
        self.features_dim = features_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of float images (N, C, H, W) in [0, 1]."""
        return self.fc(self.conv(x))


class MinAtarCNN(nn.Module):
    """Young and Tian 2019's MinAtar network body: one 3x3 convolution (16 channels) and a linear layer (128)."""

    def __init__(self, in_channels: int, image_size: tuple[int, int] = (10, 10), features_dim: int = 128) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, 16, 3, stride=1), nn.ReLU(), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(flat_size(self.conv, in_channels, image_size), features_dim), nn.ReLU())
        self.features_dim = features_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of float images (N, C, H, W) in [0, 1]."""
        return self.fc(self.conv(x))


class MLPEncoder(nn.Module):
    """Tanh MLP for vector observations: SB3's default MlpPolicy body (64-64) and a 64-unit feature layer on it."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (64, 64), features_dim: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in (*hidden, features_dim):
            layers += [nn.Linear(in_features, width), nn.Tanh()]
            in_features = width
        self.net = nn.Sequential(*layers)
        self.features_dim = features_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of flat float observations (N, ...)."""
        return self.net(x.float())


def flat_size(conv: nn.Module, in_channels: int, image_size: tuple[int, int]) -> int:
    """The number of features `conv` gives for one image of this size."""
    with torch.no_grad():
        return int(conv(torch.zeros(1, in_channels, *image_size)).shape[1])


def build_encoder(name: str, input_shape: Sequence[int], features_dim: int | None = None) -> nn.Module:
    """Encoder `name` ("impala", "nature", "minatar", "mlp") for inputs of shape (C, H, W) or (features,)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid encoders: {', '.join(ENCODERS)}")
    if features_dim is not None:
        check_int("features_dim", features_dim, 1)  # 0 would silently mean the default
    if name == "mlp":
        in_features = int(torch.tensor(input_shape).prod())
        return MLPEncoder(in_features, features_dim=features_dim or 64)
    if len(input_shape) != 3:
        raise ValueError(
            f"encoder {name!r} needs image inputs of shape (C, H, W); got {tuple(input_shape)}; use encoder 'mlp'"
        )
    channels, height, width = input_shape
    if width <= 4 < min(channels, height):  # (84, 84, 4) rather than (4, 84, 84)
        raise ValueError(f"encoder {name!r} takes channel-first images (C, H, W); {tuple(input_shape)} looks "
                         f"channel-last: give ({width}, {channels}, {height})")
    smallest = {"nature": NATURE_MIN_SIZE, "minatar": 3}.get(name, 1)  # the MinAtar CNN's 3x3 conv is unpadded
    if min(height, width) < smallest:
        others = "'impala'" if name == "minatar" else "'minatar', 'impala'"
        raise ValueError(
            f"encoder {name!r} needs images of at least {smallest}x{smallest}; the observations are "
            f"{height}x{width} (shape {tuple(input_shape)}); use encoder={others} or 'mlp'"
        )
    cls, default_dim = {"impala": (ImpalaCNN, 256), "nature": (NatureCNN, 512), "minatar": (MinAtarCNN, 128)}[name]
    return cls(channels, image_size=(height, width), features_dim=features_dim or default_dim)


class ProjectionHead(nn.Module):
    """HaoChen et al.'s head: Linear -> BN -> ReLU -> Linear -> BN (no affine); final BN optional for ablations."""

    def __init__(self, in_dim: int, out_dim: int = 64, hidden_dim: int = 256, final_bn: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        ]
        if final_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim
        for layer in self.net:  # BatchNorm's step counter as a float, like MINCLoss's: a state_dict of floats only
            if isinstance(layer, nn.BatchNorm1d):
                layer.num_batches_tracked = layer.num_batches_tracked.to(torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding of encoder features."""
        return self.net(x)


def save_encoder(path: str, encoder: nn.Module, name: str, input_shape: Sequence[int]) -> None:
    """Write `encoder.pt`: architecture name, input shape, features_dim and weights, atomically."""
    atomic_torch_save(
        {
            "name": name,
            "input_shape": [int(s) for s in input_shape],
            "features_dim": int(encoder.features_dim),
            "state_dict": encoder.state_dict(),
        },
        path,
    )


def read_encoder_file(path: str | Path) -> dict[str, Any]:
    """The contents of an `encoder.pt` (save_encoder's keys); ValueError naming what the file holds instead."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001  (torch raises many kinds for a file it cannot read)
        raise ValueError(f"not a torch file written by minc_rl.pretrain ({one_line(error)})") from None
    if not isinstance(saved, dict) or not set(ENCODER_FILE_KEYS) <= saved.keys():
        found = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"not an encoder.pt: it holds {found}, an encoder.pt holds {list(ENCODER_FILE_KEYS)}")
    return saved


def load_encoder_weights(path: str, encoder: nn.Module, name: str, input_shape: Sequence[int]) -> None:
    """Load an `encoder.pt` into `encoder`; ValueError if it is none, or its architecture or input shape differ."""
    try:
        saved = read_encoder_file(path)
    except ValueError as error:
        raise ValueError(f"encoder file {path}: {error}") from None
    expected = (name, [int(s) for s in input_shape], int(encoder.features_dim))
    found = (saved["name"], list(saved["input_shape"]), int(saved["features_dim"]))
    if expected != found:
        raise ValueError(
            f"encoder file {path} holds (encoder, input_shape, features_dim) = {found}, "
            f"but the agent's encoder is {expected}; pretrain with the same backbone and observation shape"
        )
    encoder.load_state_dict(saved["state_dict"])


def encoder_file_problem(path: Path, encoder: str) -> str | None:
    """Why `path` is not an encoder.pt for `encoder` (save_encoder's format), or None: a torch
    file of plain tensors with the keys name, input_shape, features_dim and state_dict, written for `encoder`,
    whose weights fit that architecture and are finite. (The input shape is checked against the env later.)"""
    try:
        saved = read_encoder_file(path)
    except ValueError as error:
        return str(error)
    if saved["name"] != encoder:
        fix = f"set encoder={saved['name']} or " if saved["name"] in ENCODERS else "the agents do not take it; "
        return (f"it holds a {saved['name']!r} encoder; this run's encoder is {encoder!r} ({fix}pretrain one with "
                f"backbone={encoder})")
    try:
        expected = build_encoder(encoder, tuple(int(s) for s in saved["input_shape"])).state_dict()
    except Exception as error:  # noqa: BLE001
        return f"its input_shape {saved['input_shape']!r} does not fit encoder {encoder!r} ({one_line(error)})"
    weights = saved["state_dict"]
    shapes = {k: tuple(v.shape) for k, v in weights.items()} if isinstance(weights, dict) else None
    if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
        return f"its weights do not fit the {encoder!r} architecture (other tensor names or shapes)"
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        return f"its weights are not finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    return None
