"""AtariARI's linear probes, all labels of a game at once, and their scores.

One 256-way linear classifier per label on frozen features, each with its own Adam (eps 1e-5), its own
ReduceLROnPlateau on validation accuracy (factor 0.2, patience 5, min lr 1e-5) and its own early stopping (patience
15), as the paper's ProbeTrainer trains them one module each. Here the probes are one batched linear layer whose
Adam is written out per label (a learning rate and a step count each), so every label's weights follow exactly the
updates its own probe would get, from one matrix product per batch. Scores: weighted F1 and accuracy per label,
their means per category, and the game's score, the mean of its category means (the paper's per-game number).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from minc_rl.envs.atariari import CATEGORIES, label_categories

CLASSES = 256  # a RAM byte
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-5
LR_FACTOR, MIN_LR, PLATEAU_THRESHOLD = 0.2, 1e-5, 1e-4  # ReduceLROnPlateau(mode="max") as the paper's probes use it


@dataclass
class ProbeSettings:
    """How the probes are trained: the paper's values are the defaults."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 3e-4
    patience: int = 15  # epochs without a better validation accuracy before a probe stops
    lr_patience: int = 5  # epochs without one before its learning rate is cut by LR_FACTOR


class LinearProbes:
    """Linear 256-way probes of L labels on F features: weight (F, L * 256), bias (L * 256), each label's block
    trained by its own Adam with a per-label learning rate and step count."""

    def __init__(self, features: int, labels: int, lr: float, generator: torch.Generator) -> None:
        bound = features**-0.5  # nn.Linear's initialisation
        self.labels = labels
        self.weight = (torch.rand(features, labels * CLASSES, generator=generator) * 2 - 1).mul_(bound).requires_grad_()
        self.bias = (torch.rand(labels * CLASSES, generator=generator) * 2 - 1).mul_(bound).requires_grad_()
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in (self.weight, self.bias)]
        self.lr = torch.full((labels,), float(lr))
        self.steps = torch.zeros(labels)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, 256) class scores of features x (N, F)."""
        return torch.addmm(self.bias, x, self.weight).view(len(x), self.labels, CLASSES)

    def predict(self, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """(N, L) predicted classes."""
        with torch.no_grad():
            return torch.cat([self.logits(part).argmax(-1) for part in x.split(batch)])

    def step(self, x: torch.Tensor, y: torch.Tensor, active: torch.Tensor) -> None:
        """One Adam step of every active label's probe on the mean cross-entropy of its batch (x: (B, F), y: (B, L))."""
        losses = F.cross_entropy(self.logits(x).transpose(1, 2), y, reduction="none").mean(0)
        self.weight.grad = self.bias.grad = None
        (losses * active).sum().backward()
        with torch.no_grad():
            self.steps += active
            beta1, beta2 = ADAM_BETAS
            step_size = (self.lr / (1 - beta1**self.steps.clamp(min=1))).repeat_interleave(CLASSES)
            correction = (1 - beta2**self.steps.clamp(min=1)).sqrt().repeat_interleave(CLASSES)
            columns = active.repeat_interleave(CLASSES).bool()
            for param, (mean, square) in zip((self.weight, self.bias), self.moments):
                grad = param.grad
                mean.copy_(torch.where(columns, beta1 * mean + (1 - beta1) * grad, mean))
                square.copy_(torch.where(columns, beta2 * square + (1 - beta2) * grad * grad, square))
                update = step_size * mean / (square.sqrt() / correction + ADAM_EPS)
                param.sub_(torch.where(columns, update, torch.zeros_like(update)))


def episode_draws(episode: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows drawn as the paper's probes draw them: an episode uniformly (with replacement), then a frame of
    it uniformly."""
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    lengths = np.diff(np.r_[starts, len(episode)])
    chosen = rng.integers(0, len(starts), count)
    return starts[chosen] + (rng.random(count) * lengths[chosen]).astype(np.int64)


def train_probes(train: tuple[torch.Tensor, torch.Tensor, np.ndarray], val: tuple[torch.Tensor, torch.Tensor],
                 settings: ProbeSettings, seed: int, progress: bool = True) -> tuple[LinearProbes, np.ndarray]:
    """Probes trained on (features, labels, episode of each row) and early-stopped on validation accuracy; returns
    them and the epochs each label trained. An epoch is as many draws as there are training rows."""
    from tqdm.auto import tqdm

    x, y, episode = train
    val_x, val_y = val
    labels = y.shape[1]
    probes = LinearProbes(x.shape[1], labels, settings.lr, torch.Generator().manual_seed(seed))
    rng = np.random.default_rng(seed)
    best = np.full(labels, -np.inf)  # early stopping's best accuracy and count of epochs without a better one
    waited = np.zeros(labels, np.int64)
    plateau_best, plateau_waited = np.full(labels, -np.inf), np.zeros(labels, np.int64)
    active = np.ones(labels, bool)
    epochs = np.zeros(labels, np.int64)
    bar = tqdm(range(settings.epochs), desc="probes", unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        draws = episode_draws(episode, len(x), rng)
        mask = torch.as_tensor(active, dtype=torch.float32)
        for batch in range(len(draws) // settings.batch_size):
            rows = torch.as_tensor(draws[batch * settings.batch_size:(batch + 1) * settings.batch_size])
            probes.step(x[rows], y[rows], mask)
        epochs += active
        accuracy = (probes.predict(val_x) == val_y).float().mean(0).numpy()
        better = accuracy > best
        waited = np.where(active & ~better, waited + 1, np.where(better, 0, waited))
        best = np.where(active & better, accuracy, best)
        active &= waited < settings.patience
        improved = accuracy > plateau_best * (1 + PLATEAU_THRESHOLD)  # torch's rel threshold (mode max)
        plateau_best = np.where(active & improved, accuracy, plateau_best)
        plateau_waited = np.where(active & ~improved, plateau_waited + 1, np.where(improved, 0, plateau_waited))
        cut = active & (plateau_waited > settings.lr_patience)
        probes.lr = torch.where(torch.as_tensor(cut), (probes.lr * LR_FACTOR).clamp(min=MIN_LR), probes.lr)
        plateau_waited[cut] = 0
        bar.set_postfix(active=int(active.sum()), val_acc=f"{accuracy.mean():.3f}")
        if not active.any():
            break
    bar.close()
    return probes, epochs


def label_scores(predicted: np.ndarray, true: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """Per label: weighted F1 (scikit-learn's, as the paper) and accuracy of predicted (N, L) against true (N, L)."""
    return {name: {"f1": float(f1_score(true[:, i], predicted[:, i], average="weighted", zero_division=0)),
                   "accuracy": float((true[:, i] == predicted[:, i]).mean())}
            for i, name in enumerate(names)}  # fmt: skip


def majority_predictions(train: np.ndarray, rows: int) -> np.ndarray:
    """The most frequent training value of each label (train: (N, L)), for `rows` rows."""
    majority = [np.bincount(column, minlength=CLASSES).argmax() for column in train.T]
    return np.tile(np.asarray(majority, dtype=train.dtype), (rows, 1))


def summarize(scores: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The paper's aggregation of label scores: the mean within each category (a category without a label is left
    out; a label may count in two), the game's score as the mean of the category means, and the mean over labels."""
    summary: dict[str, Any] = {"categories": {}}
    for category in CATEGORIES:
        members = [s for name, s in scores.items() if category in label_categories(name)]
        if members:
            summary["categories"][category] = {m: float(np.mean([s[m] for s in members])) for m in ("f1", "accuracy")}
    for metric in ("f1", "accuracy"):
        summary[metric] = float(np.mean([c[metric] for c in summary["categories"].values()]))
        summary[f"label_mean_{metric}"] = float(np.mean([s[metric] for s in scores.values()]))
    return summary
