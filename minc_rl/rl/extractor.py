"""MincExtractor: the project's encoders (IMPALA, Nature, MinAtar CNN, MLP) as an SB3 features extractor."""

from __future__ import annotations

import gymnasium as gym
import torch
from stable_baselines3.common.preprocessing import get_flattened_obs_dim, is_image_space, is_image_space_channels_first
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from minc_rl.common.checks import check_choice
from minc_rl.rl.settings import ENCODER_CHOICES
from minc_rl.ssl.encoders import NATURE_MIN_SIZE, build_encoder

ENCODED_SPACES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


class NotAnImageError(ValueError, AssertionError):
    """A CNN encoder on observations that are not images as SB3 defines them. A ValueError, and an AssertionError
    as SB3's NatureCNN raises in the same case, so code written against SB3's CnnPolicy catches it too."""


def encoder_input_shape(observation_space: gym.Space, channels_first: bool | None = None) -> tuple[int, ...]:
    """Shape the encoder sees: (C, H, W) for 3-D boxes (channels-last ones are transposed; `channels_first` None:
    SB3's guess, the smallest axis is the channels'), the box's shape for other boxes, and for Discrete /
    MultiDiscrete / MultiBinary the size of SB3's one-hot preprocessing."""
    if isinstance(observation_space, gym.spaces.Dict):
        raise ValueError(
            f"MincExtractor encodes a single observation; got {observation_space}. For Dict observations use "
            "MultiInputPolicy (SB3's CombinedExtractor, which MincPPO / MincDQN keep) or your own extractor"
        )
    if not isinstance(observation_space, ENCODED_SPACES):
        raise ValueError(
            f"MincExtractor encodes Box, Discrete, MultiDiscrete or MultiBinary observations (those SB3's "
            f"preprocessing knows); got {observation_space}"
        )
    if not isinstance(observation_space, gym.spaces.Box):
        return (int(get_flattened_obs_dim(observation_space)),)
    shape = tuple(int(s) for s in observation_space.shape)
    if channels_first is None:
        channels_first = len(shape) != 3 or is_image_space_channels_first(observation_space)
    if len(shape) == 3 and not channels_first:
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
    """Encoder (IMPALA / Nature CNN / MinAtar CNN / MLP) as an SB3 features extractor, for any SB3 policy.

    The auxiliary loss does not live here: MincPPO, MincDQN and MincAuxCallback attach their projection head and
    loss to whatever features extractor the policy has; this one is their convenient default. Images arrive
    scaled to [0, 1] by SB3's preprocessing; channels-last boxes are transposed here. Discrete, MultiDiscrete and
    MultiBinary observations arrive one-hot encoded by SB3's preprocessing and go through the MLP; Dict
    observations are MultiInputPolicy's (SB3's CombinedExtractor). `channels_first` says where an image's channels
    are (None: SB3's guess from the smallest axis, which a 10 x 10 image of more than 10 channels defeats).
    """

    def __init__(
        self,
        observation_space: gym.Space,
        encoder: str = "auto",
        features_dim: int | None = None,
        normalized_image: bool = False,
        channels_first: bool | None = None,
    ) -> None:
        if features_dim is not None and (not isinstance(features_dim, int) or features_dim < 1):
            raise ValueError(f"features_dim must be a positive integer or None; got {features_dim!r}")
        input_shape = encoder_input_shape(observation_space, channels_first)
        encoder_name = resolve_encoder(encoder, input_shape)
        if encoder_name != "mlp" and not is_image_space(observation_space, normalized_image=normalized_image):
            raise NotAnImageError(  # as strict as SB3's NatureCNN
                f"encoder={encoder_name!r} is a CNN for images, but {observation_space} is not an image space as SB3 "
                "defines it (uint8 in [0, 255]); use encoder='mlp' (MlpPolicy), or pass normalized_image=True in "
                "features_extractor_kwargs for images already scaled"
            )
        network = build_encoder(encoder_name, input_shape, features_dim)
        super().__init__(observation_space, network.features_dim)
        self.encoder = network
        self.encoder_name = encoder_name
        self.input_shape = input_shape
        self.channels_last = len(input_shape) == 3 and tuple(observation_space.shape) != input_shape

    def encoder_inputs(self, observations: torch.Tensor) -> torch.Tensor:
        """Preprocessed observations laid out as the encoder expects (channels first)."""
        return observations.permute(0, 3, 1, 2) if self.channels_last else observations

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Encoder features of preprocessed observations."""
        return self.encoder(self.encoder_inputs(observations))
