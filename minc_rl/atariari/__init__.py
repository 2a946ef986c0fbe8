"""minc_rl.atariari: what an encoder knows about the game's state, by AtariARI's linear probes of Atari RAM labels
(Anand et al. 2019). Its data protocol on collected episodes (protocol), the batched probes and their scores
(probes), the encoders probed: random CNN, a pretrained backbone, an RL agent's encoder (features), and the probe run
of `python -m minc_rl.probe` (run). The labelled frames themselves are minc_rl.envs.atariari. Imports every room
below it: minc_rl.common, configs, losses, envs, ssl, rl, agents and runs."""
