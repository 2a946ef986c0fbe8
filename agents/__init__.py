"""SB3 PPO and DQN with an auxiliary representation loss (MINC, spectral, InfoNCE) on consecutive observations."""

from minc_rl.agents.auxiliary import AUGMENT_CHOICES
from minc_rl.agents.dqn import MincDQN
from minc_rl.agents.ppo import MincPPO
from minc_rl.extractor import AUX_CHOICES

__all__ = ["AUGMENT_CHOICES", "AUX_CHOICES", "MincDQN", "MincPPO"]
