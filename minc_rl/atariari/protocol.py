"""AtariARI's data protocol on collected episodes: short episodes dropped, labels of low entropy dropped, a split by
episode into train, validation and test, and test frames that also occur in train or validation removed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from minc_rl.envs.atariari import Episodes, split_episodes

SPLIT_FRACTIONS = (0.7, 0.1)  # train and validation; the test part is the remaining 0.2 (the paper's split)


@dataclass
class ProbeData:
    """Rows of an Episodes object for each part of the probe protocol, and the labels that passed the entropy filter."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    labels: list[str]  # kept, in the game's order
    entropy: dict[str, float]  # every label's, in nats
    duplicates: int  # test frames removed because train or validation shows the same frame
    episodes: dict[str, int]  # per part


def label_entropy(values: np.ndarray) -> float:
    """The entropy in nats of the empirical distribution of one label's values."""
    counts = np.unique(values, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def frame_digests(frames: np.ndarray) -> list[bytes]:
    """A digest per frame, so that equal frames are found without holding their bytes in a set."""
    return [hashlib.blake2b(frame.tobytes(), digest_size=16).digest() for frame in frames]


def prepare(episodes: Episodes, seed: int, min_episode_length: int, entropy_threshold: float) -> ProbeData:
    """The probe protocol: episodes of at most min_episode_length frames are dropped, then labels whose entropy over
    the remaining frames is below entropy_threshold; the episodes are split 70/10/20 by a shuffle of `seed`, and the
    test frames equal to a train or validation frame are removed. ValueError where too few episodes remain."""
    starts = episodes.starts()
    lengths = np.diff(starts)
    kept = np.flatnonzero(lengths > min_episode_length)
    if len(kept) < 3:
        raise ValueError(f"{len(episodes)} frames of {episodes.game} hold {len(kept)} episodes longer than "
                         f"min_episode_length={min_episode_length}; at least 3 are needed (collect more frames)")
    rows = [np.arange(starts[e], starts[e + 1]) for e in kept]
    entropy = {name: label_entropy(episodes.labels[np.concatenate(rows), i])
               for i, name in enumerate(episodes.label_names)}  # fmt: skip
    parts = [np.concatenate([rows[i] for i in part]) if len(part) else np.empty(0, np.int64)
             for part in split_episodes(len(kept), SPLIT_FRACTIONS, seed)]  # fmt: skip
    if any(len(part) == 0 for part in parts):
        raise ValueError(f"{len(kept)} episodes of {episodes.game} leave a part of the 70/10/20 split empty; "
                         "collect more frames")
    train, val, test = parts
    seen = set(frame_digests(episodes.frames[np.concatenate([train, val])]))
    fresh = np.array([digest not in seen for digest in frame_digests(episodes.frames[test])], dtype=bool)
    sizes = [int(fraction * len(kept)) for fraction in SPLIT_FRACTIONS]
    return ProbeData(
        train=train, val=val, test=test[fresh],
        labels=[name for name in episodes.label_names if entropy[name] >= entropy_threshold],
        entropy=entropy, duplicates=int((~fresh).sum()),
        episodes={"train": sizes[0], "val": sizes[1], "test": len(kept) - sum(sizes)},
    )  # fmt: skip
