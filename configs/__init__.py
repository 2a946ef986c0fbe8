"""minc_rl.configs."""
