"""minc_rl.ssl: representation learning on images, shared by pretraining and the RL agents. Encoders and the
projection head, and the encoder.pt format (encoders), pretraining backbones (backbones), augmentations (augment),
embedding-health metrics (metrics), image data sets (data), linear probe / kNN / linear evaluation (linear_eval)
and the pretraining run (pretraining). Imports minc_rl.common, minc_rl.configs, minc_rl.losses and
minc_rl.envs."""
