"""The encoders an AtariARI probe reads: the paper's encoder at random initialisation (the random-CNN baseline), a
backbone pretrained by minc_rl.pretrain, and an RL agent's encoder from a minc_rl.train run, each computing its
features once per frame."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from minc_rl.envs.atariari import Episodes
from minc_rl.ssl.backbones import AtariARICNN
from minc_rl.ssl.linear_eval import backbone_from_checkpoint, read_checkpoint

FRAME_SHAPE = (1, 210, 160)
# what an encoder makes of some rows of episodes: (len(rows), F) float32 features, one row per frame
Encoder = Callable[[Episodes, np.ndarray], torch.Tensor]


@torch.no_grad()
def frame_features(network: Callable[[torch.Tensor], torch.Tensor], inputs: Callable[[np.ndarray], torch.Tensor],
                   rows: np.ndarray, batch: int = 256, desc: str = "features", progress: bool = True) -> torch.Tensor:
    """network(inputs(part)) over `rows` in batches, as one (len(rows), F) float32 tensor."""
    from tqdm.auto import tqdm

    parts = [network(inputs(rows[start:start + batch])).float()
             for start in tqdm(range(0, len(rows), batch), desc=desc, unit="batch", disable=not progress, leave=False)]
    return torch.cat(parts)


def backbone_encoder(backbone: nn.Module, progress: bool = True) -> Encoder:
    """A backbone on full frames (1, 210, 160) scaled to [0, 1], as minc_rl.pretrain feeds them."""

    backbone.eval()

    def encode(episodes: Episodes, rows: np.ndarray) -> torch.Tensor:
        frames = torch.from_numpy(episodes.frames)
        return frame_features(backbone, lambda part: frames[part].unsqueeze(1).float() / 255.0, rows,
                              progress=progress)

    return encode


def random_cnn(seed: int, progress: bool = True) -> Encoder:
    """The random-CNN baseline: the paper's encoder, initialised from `seed`, never trained."""
    torch.manual_seed(seed)
    return backbone_encoder(AtariARICNN(1, FRAME_SHAPE[1:]), progress)


def pretrained(path: str, progress: bool = True) -> tuple[str, Encoder]:
    """(its loss's name, the backbone) of a minc_rl.pretrain checkpoint.pt or run dir on full Atari frames;
    ValueError (one line) for another file or input shape."""
    checkpoint = read_checkpoint(path, "encoder")
    if list(checkpoint["input_shape"]) != list(FRAME_SHAPE):
        raise ValueError(f"encoder={path} was pretrained on images of shape {tuple(checkpoint['input_shape'])}; the "
                         f"probe reads full Atari frames {FRAME_SHAPE} (pretrain with data=atari)")
    return checkpoint["config"]["loss"]["name"], backbone_encoder(backbone_from_checkpoint(checkpoint), progress)


def agent_observations(frames: np.ndarray, episode: np.ndarray, rows: np.ndarray, size: int, stack: int) -> np.ndarray:
    """The observations (len(rows), stack, size, size) uint8 an SB3 Atari agent sees at these frames: each frame
    resized as SB3's WarpFrame does (cv2 INTER_AREA), the last `stack` of its episode stacked oldest first, zeros
    before the episode's first frame (VecFrameStack at a reset)."""
    import cv2

    observations = np.zeros((len(rows), stack, size, size), np.uint8)
    for i, row in enumerate(rows):
        for k in range(stack):
            source = row - (stack - 1 - k)
            if source >= 0 and episode[source] == episode[row]:
                observations[i, k] = cv2.resize(frames[source], (size, size), interpolation=cv2.INTER_AREA)
    return observations


def agent(run_dir: str, game: str, progress: bool = True) -> tuple[str, Encoder]:
    """(its aux loss's name, the encoder) of the latest checkpoint of a minc_rl.train run on this Atari game: the
    features the agent acts from (DQN's Q-network, PPO's actor) on its own preprocessing of the frames (84x84,
    frame stack 4, or the run's env_options). Its frame stack restarts at a lost life, as the training envs' does
    under the default terminal_on_life_loss. ValueError (one line) for another run."""
    from minc_rl.envs.spec import parse_spec, resolve_atari
    from minc_rl.rl.health import agent_encoder
    from minc_rl.runs.run_io import latest_checkpoint
    from minc_rl.runs.train_config import aux_config
    from minc_rl.runs.training import AGENTS

    folder = Path(run_dir).expanduser()
    if not (folder / "config.yaml").is_file():
        raise ValueError(f"agent={run_dir}: no config.yaml there; give the run dir of a minc_rl.train run")
    cfg = OmegaConf.load(folder / "config.yaml")
    family, name = parse_spec(cfg.env)
    if family != "atari" or resolve_atari(name, {}) != resolve_atari(game, {}):
        raise ValueError(f"agent={run_dir} was trained on env={cfg.env}; this probe's game is {game} (atari:{game})")
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise ValueError(f"agent={run_dir} has no checkpoint in {folder / 'checkpoints'}")
    model = AGENTS[cfg.agent.name].load(checkpoint, device="cpu", aux=aux_config(cfg))
    network, extractor = agent_encoder(model)
    network.eval()
    options = cfg.get("env_options") or {}
    size, stack = int(options.get("screen_size", 84)), int(options.get("frame_stack", 4))

    def encode(episodes: Episodes, rows: np.ndarray) -> torch.Tensor:
        def inputs(part: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(agent_observations(episodes.frames, episodes.episode, part, size, stack))

        return frame_features(lambda x: network.extract_features(x, extractor), inputs, rows, desc="agent features",
                              progress=progress)

    return cfg.aux.name, encode
