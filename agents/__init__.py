"""minc_rl.agents."""
