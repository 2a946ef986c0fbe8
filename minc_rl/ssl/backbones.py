"""Backbones for image pretraining: torchvision ResNets with the small-image stem, a small CNN, AtariARI's encoder
for full Atari frames, and the RL encoders."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from minc_rl.ssl.encoders import ENCODERS, build_encoder, flat_size

RESNETS = ("resnet18", "resnet50")
BACKBONES = (*RESNETS, "convnet", *ENCODERS, "atariari")


class ConvNet(nn.Module):
    """Two-convolution CNN for tiny images (8x8 digits): conv3x3-ReLU-conv3x3/2-ReLU-linear-ReLU."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], features_dim: int = 128) -> None:
        super().__init__()
        height, width = image_size
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * ((height + 1) // 2) * ((width + 1) // 2), features_dim),
            nn.ReLU(),
        )
        self.features_dim = features_dim

    def forward(self, x):
        """Features of float images (N, C, H, W) in [0, 1]."""
        return self.net(x)


class AtariARICNN(nn.Module):
    """The encoder of AtariARI (Anand et al. 2019) for full 210x160 frames: convolutions of 32 (8/4), 64 (4/2),
    128 (4/2) and 64 (3/1) channels with ReLUs, then a linear layer to 256 features without a ReLU; orthogonal
    weights with ReLU gain and zero biases, as the paper's NatureCNN (no_downsample) initialises them."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], features_dim: int = 256) -> None:
        super().__init__()
        conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 128, 4, stride=2), nn.ReLU(),
            nn.Conv2d(128, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )  # fmt: skip
        self.net = nn.Sequential(*conv, nn.Linear(flat_size(conv, in_channels, image_size), features_dim))
        for layer in self.net:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(layer.weight, nn.init.calculate_gain("relu"))
                nn.init.zeros_(layer.bias)
        self.features_dim = features_dim

    def forward(self, x):
        """Features of float images (N, C, H, W) in [0, 1]."""
        return self.net(x)


def _torchvision_models():
    try:
        import torchvision.models
    except ImportError as error:
        raise ImportError(
            "ResNet backbones need torchvision: install the `vision` extra: pip install 'minc-rl[vision]'"
        ) from error
    return torchvision.models


def build_resnet(name: str, in_channels: int = 3, small_images: bool = True) -> nn.Module:
    """torchvision ResNet-18/50 without its classifier; `small_images` swaps in the CIFAR stem (3x3/1 conv, no max-pool)."""
    if name not in RESNETS:
        raise ValueError(f"unknown ResNet {name!r}; valid: {', '.join(RESNETS)}")
    model = getattr(_torchvision_models(), name)(weights=None)
    if small_images:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    model.features_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def build_backbone(name: str, input_shape: Sequence[int], features_dim: int | None = None) -> nn.Module:
    """Backbone `name` (one of BACKBONES) for images of shape (C, H, W); every backbone has `.features_dim`.

    ResNets use the small-image stem for inputs of at most 64x64 pixels; `features_dim` applies to the
    RL encoders and the small CNN (ResNets have 512 or 2048 features).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    if len(input_shape) != 3:
        raise ValueError(f"backbone {name!r} needs image inputs of shape (C, H, W); got {tuple(input_shape)}")
    channels, height, width = (int(s) for s in input_shape)
    if name in RESNETS:
        if features_dim is not None:
            raise ValueError(f"backbone {name!r} has a fixed feature size; leave features_dim unset (got {features_dim})")
        return build_resnet(name, channels, small_images=max(height, width) <= 64)
    if name == "convnet":
        return ConvNet(channels, (height, width), features_dim or 128)
    if name == "atariari":
        return AtariARICNN(channels, (height, width), features_dim or 256)
    return build_encoder(name, input_shape, features_dim)
