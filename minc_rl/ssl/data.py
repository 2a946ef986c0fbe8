"""Pretraining data sets (digits, procgen frames, AtariARI frames, CIFAR-10, image folders) as pair batches, and
AtariARI's episodes as action sequences for loss=selfpred; nothing is downloaded."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from minc_rl.common.checks import one_line
from minc_rl.envs.spec import PROCGEN_GAMES
from minc_rl.losses.latent import sequence_masks

DATASETS = ("digits", "procgen", "atari", "cifar10", "imagefolder")
PAIRS = ("augment", "temporal")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
CIFAR_LAYOUT = (
    "the CIFAR-10 python version: <root>/cifar-10-batches-py/ (or <root>/ itself) holding the pickled "
    "batches data_batch_1 ... data_batch_5 and test_batch, each a dict with b'data' (N x 3072 uint8) "
    "and b'labels'"
)
IMAGEFOLDER_LAYOUT = (
    "<root>/train/<class>/<image> and <root>/val/<class>/<image> (ImageNet style), with the same "
    f"class folders in both and images ending in {', '.join(IMAGE_EXTENSIONS)}"
)


class DataRootError(ValueError):
    """A data root that is missing or does not have the expected layout."""


class PairDataset(Dataset):
    """Images in memory; item i is (image, positive, label), the positive being the image itself or its successor.

    `__getitems__` returns whole batches, so a DataLoader with `collate_fn=collate_pairs` indexes the
    tensors once per batch instead of once per image.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, anchors=None, positives=None) -> None:
        self.images = images
        self.labels = labels
        self.anchors = torch.arange(len(images)) if anchors is None else torch.as_tensor(anchors)
        self.positives = self.anchors if positives is None else torch.as_tensor(positives)

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        anchors = self.anchors[index]
        images = self.images[anchors]
        positives = images if self.positives is self.anchors else self.images[self.positives[index]]
        return images, positives, self.labels[anchors]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b, y = self.__getitems__([i])
        return a[0], b[0], y[0]


class SequenceDataset(Dataset):
    """Frames of episodes in memory; item i is (o_t, a_t..a_t+K-1, o_t+1..o_t+K, held) for t = anchors[i], with
    `held[k]` true where o_t+k+1 is in o_t's episode (minc_rl.losses.latent.sequence_masks, `actions` -1 marking an
    episode's last frame as minc_rl.envs.atariari.Episodes does). A step that is not held has action 0 and o_t's frame
    as placeholders. `__getitems__` returns whole batches, as PairDataset's."""

    def __init__(
        self, images: torch.Tensor, actions: np.ndarray, anchors: np.ndarray, horizon: int, num_actions: int
    ) -> None:
        self.images = images
        self.num_actions = num_actions
        self.anchors = torch.as_tensor(anchors, dtype=torch.long)
        steps = np.asarray(anchors)[:, None] + np.arange(horizon)  # (N, K): transitions t..t+K-1
        taken = actions[np.minimum(steps, len(images) - 1)]
        in_data = steps + 1 < len(images)  # the successor o_t+k+1 is among the frames
        _, held = sequence_masks(in_data, taken < 0, end_successor_missing=True)
        self.held = torch.from_numpy(held)
        self.actions = torch.from_numpy(np.where(held, taken, 0))
        self.successors = torch.from_numpy(np.where(held, steps + 1, steps[:, :1]))

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        successors = self.images[self.successors[index]]
        return self.images[self.anchors[index]], self.actions[index], successors, self.held[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        o, a, successors, held = self.__getitems__([i])
        return o[0], a[0], successors[0], held[0]


class ImageFolderPairs(Dataset):
    """Class folders read with Pillow: shorter side resized to `load_size`, centre-cropped square, uint8 (C, H, W)."""

    def __init__(self, files: list[Path], labels: list[int], load_size: int) -> None:
        self.files = files
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.load_size = load_size

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> torch.Tensor:
        from PIL import Image

        try:
            image = Image.open(path)
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # Pillow's UnidentifiedImageError is an OSError
            raise DataRootError(f"imagefolder file {str(path)!r} cannot be decoded as an image ({one_line(error)}); "
                                "remove or replace it") from None
        with image:
            image = image.convert("RGB")
            scale = self.load_size / min(image.size)
            width, height = max(self.load_size, round(image.width * scale)), max(self.load_size, round(image.height * scale))
            image = image.resize((width, height), Image.BILINEAR)
            left, top = (width - self.load_size) // 2, (height - self.load_size) // 2
            image = image.crop((left, top, left + self.load_size, top + self.load_size))
            return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = torch.stack([self._load(self.files[i]) for i in indices])
        return images, images, self.labels[torch.as_tensor(indices, dtype=torch.long)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b, y = self.__getitems__([i])
        return a[0], b[0], y[0]


def collate_pairs(batch: Any) -> Any:
    """DataLoader collate for datasets whose `__getitems__` already returns a batch."""
    return batch


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [0, 1]; float images pass through."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


@dataclass
class SSLData:
    """Train and held-out pair data sets with what the model needs to know about them."""

    train: Dataset
    val: Dataset
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    sequences: SequenceDataset | None = None  # loss=selfpred's training items (the train split's episodes), else None


def load_data(name: str, **options: Any) -> SSLData:
    """Load data set `name` (one of DATASETS); `options` are the fields of its `data` config."""
    loaders = {"digits": load_digits, "procgen": load_procgen, "atari": load_atari, "cifar10": load_cifar10,
               "imagefolder": load_imagefolder}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; valid data sets: {', '.join(DATASETS)}")
    return loaders[name](**options)


def load_digits(val_fraction: float = 0.2, split_seed: int = 0, **_: Any) -> SSLData:
    """scikit-learn's bundled 8x8 digits (1797 images, 16 grey levels) with a stratified held-out split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = torch.as_tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train, val = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, random_state=split_seed, stratify=digits.target
    )
    return SSLData(
        PairDataset(images[train], labels[train]),
        PairDataset(images[val], labels[val]),
        (1, 8, 8),
        10,
        [str(d) for d in range(10)],
    )


def _procgen_frames(game: str, num_envs: int, steps: int, start_level: int, num_levels: int, seed: int):
    """(steps, num_envs, 3, 64, 64) uint8 frames and (steps, num_envs) episode-start flags under random actions."""
    from procgen import ProcgenGym3Env

    env = ProcgenGym3Env(
        num=num_envs, env_name=game, start_level=start_level, num_levels=num_levels,
        distribution_mode="easy", rand_seed=seed,
    )
    rng = np.random.default_rng(seed)
    frames, firsts = [], []
    for _ in range(steps):
        _, obs, first = env.observe()
        frames.append(obs["rgb"].copy())
        firsts.append(first.copy())
        env.act(rng.integers(0, env.ac_space.eltype.n, size=num_envs))
    env.close()
    frames = torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3).contiguous()
    return frames, torch.from_numpy(np.stack(firsts))


def _procgen_split(games, pairs, num_envs, steps, start_level, num_levels, seed) -> PairDataset:
    all_frames, all_labels, anchors, positives = [], [], [], []
    offset = 0
    for label, game in enumerate(games):
        frames, firsts = _procgen_frames(game, num_envs, steps, start_level, num_levels, seed + label)
        flat = torch.arange(steps * num_envs).reshape(steps, num_envs) + offset
        if pairs == "temporal":
            keep = ~firsts[1:]  # o_{t+1} must belong to the same episode as o_t
            anchors.append(flat[:-1][keep])
            positives.append(flat[1:][keep])
        else:
            anchors.append(flat.flatten())
            positives.append(flat.flatten())
        all_frames.append(frames.flatten(0, 1))
        all_labels.append(torch.full((steps * num_envs,), label, dtype=torch.long))
        offset += steps * num_envs
    return PairDataset(torch.cat(all_frames), torch.cat(all_labels), torch.cat(anchors), torch.cat(positives))


def load_procgen(
    games: Sequence[str] = ("coinrun", "starpilot", "bigfish", "fruitbot"),
    pairs: str = "augment",
    num_envs: int = 16,
    steps: int = 64,
    num_levels: int = 200,
    val_steps: int = 16,
    seed: int = 0,
    **_: Any,
) -> SSLData:
    """Frames of procgen games under random actions; the label is the game, the held-out split uses unseen levels.

    pairs="augment": both views come from one frame; pairs="temporal": (o_t, o_t+1) of the same episode.
    """
    if pairs not in PAIRS:
        raise ValueError(f"unknown procgen pairs {pairs!r}; valid: {', '.join(PAIRS)}")
    games = list(games)
    unknown = [game for game in games if game not in PROCGEN_GAMES]  # procgen aborts the process on one
    if unknown:
        raise ValueError(f"data.games: unknown procgen game(s) {unknown}; valid: {', '.join(PROCGEN_GAMES)}")
    train = _procgen_split(games, pairs, num_envs, steps, 0, num_levels, seed)
    val = _procgen_split(games, "augment", num_envs, val_steps, num_levels, 0, seed + 10_000)
    return SSLData(train, val, (3, 64, 64), len(games), games)


def load_atari(
    game: str = "pong",
    frames: int = 100_000,
    seed: int = 0,
    label: str | None = None,
    val_fraction: float = 0.2,
    cache_dir: str | None = None,
    progress: bool = True,
    horizon: int | None = None,
    **_: Any,
) -> SSLData:
    """A random agent's frames of an AtariARI game (minc_rl.envs.atariari, cached in cache_dir) as (x_t, x_t+1) pairs
    of one episode, the episodes split into train and held-out parts. The label, for the run's own probe and kNN, is
    one RAM label's byte (256 classes): `label`, or the game's first agent-localization label. With a `horizon` K
    (loss=selfpred) the same anchors x_t also make `sequences`: the K actions and frames after each."""
    from minc_rl.envs.atariari import label_categories, load_or_collect, make_ale_env, split_episodes

    episodes = load_or_collect(game, frames, seed, cache_dir, progress)
    names = episodes.label_names
    label = label or next((n for n in names if "agent_localization" in label_categories(n)), names[0])
    if label not in names:
        raise ValueError(f"data.label={label!r} is not a label of {game}; its labels: {', '.join(names)}")
    count = int(episodes.episode[-1]) + 1
    if count < 2:
        raise ValueError(f"data.frames={frames} make {count} episode of {game}; at least 2 are needed for a held-out part")
    train, val = split_episodes(count, [1 - val_fraction], seed)
    in_train = np.isin(episodes.episode, train)
    anchors = np.flatnonzero(in_train[:-1] & (episodes.episode[1:] == episodes.episode[:-1]))
    images = torch.from_numpy(episodes.frames).unsqueeze(1)
    labels = torch.from_numpy(episodes.labels[:, names.index(label)].astype(np.int64))
    sequences = None
    if horizon is not None:
        env = make_ale_env(game, seed)  # the game's action set: the agent draws from 1..n-1, a short run may miss one
        sequences = SequenceDataset(images, episodes.actions, anchors, horizon, int(env.action_space.n))
        env.close()
    return SSLData(
        PairDataset(images, labels, anchors, anchors + 1),
        PairDataset(images, labels, np.flatnonzero(np.isin(episodes.episode, val))),
        (1, *episodes.frames.shape[1:]),
        256,
        [str(value) for value in range(256)],
        sequences,
    )


def _cifar_dir(root: Path) -> Path:
    for folder in (root / "cifar-10-batches-py", root):
        if (folder / "data_batch_1").is_file():
            return folder
    raise DataRootError(f"cifar10 data root {str(root)!r} has no CIFAR-10 batches; expected {CIFAR_LAYOUT}")


def _read_cifar_batches(folder: Path, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            target = np.asarray(batch[b"labels"], dtype=np.int64)
            if len(target) != len(data):
                raise ValueError(f"{len(data)} images but {len(target)} labels")
        except Exception as error:
            raise DataRootError(f"cifar10 file {str(path)!r} is missing or malformed ({error}); expected {CIFAR_LAYOUT}") from error
        images.append(torch.from_numpy(data))
        labels.append(torch.from_numpy(target))
    return torch.cat(images), torch.cat(labels)


def load_cifar10(root: str | None = None, **_: Any) -> SSLData:
    """CIFAR-10 from its standard on-disk python batches under `root` (never downloaded)."""
    if root is None:
        raise DataRootError(f"cifar10 needs data.root=<path>; expected {CIFAR_LAYOUT}")
    folder = _cifar_dir(Path(root).expanduser())
    train_images, train_labels = _read_cifar_batches(folder, [f"data_batch_{i}" for i in range(1, 6)])
    val_images, val_labels = _read_cifar_batches(folder, ["test_batch"])
    names = [f"class_{i}" for i in range(10)]
    meta = folder / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as handle:
            names = [n.decode() for n in pickle.load(handle, encoding="bytes")[b"label_names"]]
    return SSLData(PairDataset(train_images, train_labels), PairDataset(val_images, val_labels), (3, 32, 32), 10, names)


def _image_files(split: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        files += found
        labels += [label] * len(found)
    return files, labels


def load_imagefolder(root: str | None = None, load_size: int = 256, **_: Any) -> SSLData:
    """ImageNet-style class folders under `root`/train and `root`/val, decoded lazily with Pillow."""
    if root is None:
        raise DataRootError(f"imagefolder needs data.root=<path>; expected {IMAGEFOLDER_LAYOUT}")
    root_path = Path(root).expanduser()
    splits = {}
    for split in ("train", "val"):
        folder = root_path / split
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not classes:
            raise DataRootError(
                f"imagefolder data root {str(root_path)!r} has no class folders in {str(folder)!r}; expected {IMAGEFOLDER_LAYOUT}"
            )
        splits[split] = classes
    classes = splits["train"]
    if splits["val"] != classes:
        raise DataRootError(
            f"imagefolder data root {str(root_path)!r}: val classes {splits['val']} differ from train classes "
            f"{classes}; expected {IMAGEFOLDER_LAYOUT}"
        )
    datasets = {}
    for split in ("train", "val"):
        files, labels = _image_files(root_path / split, classes)
        if not files:
            raise DataRootError(f"imagefolder split {str(root_path / split)!r} holds no images; expected {IMAGEFOLDER_LAYOUT}")
        datasets[split] = ImageFolderPairs(files, labels, load_size)
    return SSLData(datasets["train"], datasets["val"], (3, load_size, load_size), len(classes), classes)
