"""Batched image augmentations (kornia, per-sample random parameters) for the two views of a pair."""

from __future__ import annotations

import kornia.augmentation as K
import torch


def random_shift(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """DrQ random shift (Kostrikov et al. 2020): replicate-pad by `pad`, then crop back at a random offset per image."""
    height, width = images.shape[-2:]
    crop = K.RandomCrop((height, width), padding=pad, padding_mode="replicate", p=1.0)
    return crop(images.float())
