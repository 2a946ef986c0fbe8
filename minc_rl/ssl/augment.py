"""Batched image augmentations (kornia, per-sample random parameters) for the two views of a pair."""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn


def random_shift(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """DrQ random shift (Kostrikov et al. 2020): replicate-pad by `pad`, then crop back at a random offset per image."""
    height, width = images.shape[-2:]
    crop = K.RandomCrop((height, width), padding=pad, padding_mode="replicate", p=1.0)
    return crop(images.float())


AUGMENTATIONS = ("simclr", "shift", "none")


def _per_view(value: float | Sequence[float]) -> tuple[float, float]:
    """A probability given once for both views, or as [view a, view b] (BYOL's asymmetric blur/solarize)."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    first, second = value
    return float(first), float(second)


def simclr_pipeline(
    image_size: int,
    channels: int,
    crop_scale: Sequence[float] = (0.08, 1.0),
    flip: float = 0.5,
    jitter: float = 0.8,
    jitter_strength: float = 0.5,
    grayscale: float = 0.2,
    blur: float = 0.5,
    solarize: float = 0.0,
) -> nn.Sequential:
    """SimCLR/BYOL augmentation of one view as kornia ops with per-sample parameters, scaled to `image_size`.

    Random resized crop back to `image_size`, horizontal flip, colour jitter (SimCLR strength s:
    brightness/contrast/saturation 0.8 s, hue 0.2 s), grayscale, Gaussian blur (kernel ~10% of the side,
    sigma in [0.1, 2] * side / 224, skipped below 16 pixels as SimCLR does on CIFAR) and solarize.
    Saturation, hue and grayscale apply to RGB images only.
    """
    ops: list[nn.Module] = [
        K.RandomResizedCrop((image_size, image_size), scale=tuple(crop_scale), p=1.0),
        K.RandomHorizontalFlip(p=flip),
    ]
    rgb = channels == 3
    strength = 0.8 * jitter_strength
    ops.append(
        K.ColorJitter(strength, strength, strength if rgb else 0.0, 0.2 * jitter_strength if rgb else 0.0, p=jitter)
    )
    if rgb:
        ops.append(K.RandomGrayscale(p=grayscale))
    kernel = int(0.1 * image_size) // 2 * 2 + 1
    if blur > 0 and image_size >= 16:
        scale = image_size / 224
        ops.append(K.RandomGaussianBlur(kernel, (0.1 * scale, 2.0 * scale), p=blur))
    if solarize > 0:
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize))
    return nn.Sequential(*ops)


class TwoViewAugment(nn.Module):
    """Augments the two sides of a pair batch: SimCLR/BYOL recipe, DrQ random shift, or nothing."""

    def __init__(
        self,
        kind: str,
        image_size: int,
        channels: int,
        shift_pad: int = 4,
        blur: float | Sequence[float] = 0.5,
        solarize: float | Sequence[float] = 0.0,
        **simclr: float | Sequence[float],
    ) -> None:
        super().__init__()
        if kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")
        self.kind = kind
        self.shift_pad = shift_pad
        if kind == "simclr":
            blurs, solarizes = _per_view(blur), _per_view(solarize)
            self.views = nn.ModuleList(
                simclr_pipeline(image_size, channels, blur=blurs[i], solarize=solarizes[i], **simclr) for i in (0, 1)
            )

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two float views in [0, 1] of the images a and b (the same batch for augment pairs)."""
        if self.kind == "simclr":
            return self.views[0](a).clamp(0, 1), self.views[1](b).clamp(0, 1)
        if self.kind == "shift":
            return random_shift(a, self.shift_pad), random_shift(b, self.shift_pad)
        return a, b
