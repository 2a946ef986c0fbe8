"""minc_rl.envs."""
