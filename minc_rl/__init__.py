"""minc_rl: MINC (Mutual Information Non-Contrastive) representation learning for RL and image SSL."""

__version__ = "0.1.0"
