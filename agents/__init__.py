"""SB3 PPO and DQN with an auxiliary representation loss (MINC, spectral, InfoNCE) on consecutive observations
(or state-action pairs)."""

from minc_rl.agents.auxiliary import (AUGMENT_CHOICES, AUX_CHOICES, AUX_MODES, PAIR_CHOICES, AuxConfig, AuxLearner,
                                      StateActionHead)
from minc_rl.agents.dqn import MincDQN
from minc_rl.agents.ppo import MincPPO

__all__ = ["AUGMENT_CHOICES", "AUX_CHOICES", "AUX_MODES", "PAIR_CHOICES", "AuxConfig", "AuxLearner", "MincDQN", "MincPPO",
           "StateActionHead"]
