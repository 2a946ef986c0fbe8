"""minc_rl.runs: an RL training run and a study of runs. The checks of a run's config, read before torch is
imported (train_config), the run itself (training), the files of its run directory (run_io), its SB3 callbacks
(run_callbacks: evaluation, checkpoints, stop on a signal) and the report of a study (report). Imports every room
below it: minc_rl.common, losses, envs, ssl, rl and agents."""
