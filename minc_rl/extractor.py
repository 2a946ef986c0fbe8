"""MincExtractor: an SB3 features extractor holding an encoder, a projection head and the auxiliary loss (Lambda)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from stable_baselines3.common.preprocessing import is_image_space_channels_first
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from minc_rl.checks import check_choice, check_fraction
from minc_rl.encoders import NATURE_MIN_SIZE, ENCODERS, ProjectionHead, build_encoder
from minc_rl.losses import AUX_LOSSES, build_aux_loss

AUX_CHOICES = ("none", *AUX_LOSSES)
ENCODER_CHOICES = ("auto", *ENCODERS)


def encoder_input_shape(observation_space: gym.Space) -> tuple[int, ...]:
    """Shape the encoder sees: (C, H, W) for 3-D boxes (channels-last ones are transposed), else the flat shape."""
    if not isinstance(observation_space, gym.spaces.Box):
        raise ValueError(f"MincExtractor needs a Box observation space; got {observation_space}")
    shape = tuple(int(s) for s in observation_space.shape)
    if len(shape) == 3 and not is_image_space_channels_first(observation_space):
        return (shape[2], shape[0], shape[1])
    return shape


def resolve_encoder(encoder: str, input_shape: tuple[int, ...]) -> str:
    """The encoder name for `encoder` ("auto": nature for images, minatar for images too small for it, mlp for
    vectors)."""
    check_choice("encoder", encoder, ENCODER_CHOICES)
    if encoder != "auto":
        return encoder
    if len(input_shape) != 3:
        return "mlp"
    return "nature" if min(input_shape[1:]) >= NATURE_MIN_SIZE else "minatar"


class MincExtractor(BaseFeaturesExtractor):
    """Encoder (IMPALA / Nature CNN / MLP) for SB3 policies, plus the projection head and the auxiliary loss.

    `forward` returns the encoder's features, so any SB3 policy can use it. The head maps features to
    the `aux_dim` embedding the auxiliary loss sees; the loss (and MINC's Lambda buffers) are submodules,
    so they travel in the policy's state_dict and the policy optimizer covers the head.
    Images arrive scaled to [0, 1] by SB3's preprocessing; channels-last boxes are transposed here.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        encoder: str = "auto",
        features_dim: int | None = None,
        aux: str = "minc",
        aux_dim: int = 64,
        aux_ema: float = 0.2,
        head_hidden: int = 256,
        final_bn: bool = True,
        aux_loss_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_choice("aux", aux, AUX_CHOICES)
        for name, value in (("aux_dim", aux_dim), ("head_hidden", head_hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if features_dim is not None and (not isinstance(features_dim, int) or features_dim < 1):
            raise ValueError(f"features_dim must be a positive integer or None; got {features_dim!r}")
        check_fraction("aux_ema", aux_ema)
        loss_kwargs = _check_loss_kwargs(aux, aux_loss_kwargs or {})

        input_shape = encoder_input_shape(observation_space)
        encoder_name = resolve_encoder(encoder, input_shape)
        network = build_encoder(encoder_name, input_shape, features_dim)
        super().__init__(observation_space, network.features_dim)
        self.encoder = network
        self.encoder_name = encoder_name
        self.input_shape = input_shape
        self.aux = aux
        self.channels_last = len(input_shape) == 3 and tuple(observation_space.shape) != input_shape
        self.head: ProjectionHead | None = None
        self.aux_loss: torch.nn.Module | None = None
        if aux != "none":
            self.head = ProjectionHead(network.features_dim, aux_dim, head_hidden, final_bn)
            if aux == "minc":
                loss_kwargs["ema"] = aux_ema
            self.aux_loss = build_aux_loss(aux, aux_dim, **loss_kwargs)

    def encoder_inputs(self, observations: torch.Tensor) -> torch.Tensor:
        """Preprocessed observations laid out as the encoder expects (channels first)."""
        return observations.permute(0, 3, 1, 2) if self.channels_last else observations

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Encoder features of preprocessed observations."""
        return self.encoder(self.encoder_inputs(observations))

    def reset_head(self) -> None:
        """PyTorch's default init for the projection head, without moving the global RNG streams.

        SB3 policies re-initialise every Linear layer of their features extractor orthogonally (gain sqrt 2);
        on the head that slowed the aux loss several-fold in our measurement (see the README's agents section),
        so MincPPO / MincDQN / MincAuxCallback call this after SB3 built the policy.
        """
        if self.head is None:
            return
        cuda = sorted({p.device.index or 0 for p in self.head.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            for module in self.head.modules():
                if module is not self.head and hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Projection-head embedding of encoder features (what the auxiliary loss sees)."""
        if self.head is None:
            raise ValueError("this MincExtractor was built with aux='none' and has no projection head")
        return self.head(features)


def _check_loss_kwargs(aux: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A copy of `kwargs` (build_aux_loss checks the keys against the chosen loss's options)."""
    if aux == "none" and kwargs:
        raise ValueError(f"aux_loss_kwargs={kwargs!r} were given, but aux='none' has no loss to pass them to")
    if "ema" in kwargs:
        raise ValueError(f"aux_loss_kwargs may not set 'ema' (got {kwargs['ema']!r}); set MINC's ema with aux_ema")
    return dict(kwargs)
