"""The body of `python -m minc_rl.probe game=pong [encoder=<pretraining run(s)>] [agent=<train run(s)>]`: AtariARI's
linear probes of one game for the majority and random-CNN baselines and the encoders asked for, in one run, written
as probe.json and table.md (the paper's layout: F1 per category and the game's mean of categories, then per label)."""

from __future__ import annotations

import json
import sys
from collections import Counter
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from minc_rl.atariari.features import Encoder, agent, pretrained, random_cnn
from minc_rl.atariari.probes import ProbeSettings, label_scores, majority_predictions, summarize, train_probes
from minc_rl.atariari.protocol import ProbeData, prepare
from minc_rl.common.checks import check_bool, check_int, check_nonnegative, check_positive, one_line
from minc_rl.common.cli import fail
from minc_rl.common.io import atomic_write_all
from minc_rl.configs import config_dir
from minc_rl.envs.atariari import CATEGORIES, Episodes, game_labels, load_or_collect

PROGRAM = "minc_rl.probe"
BASELINES = ("majority", "random-cnn")


def check_config(cfg: DictConfig) -> None:
    """ValueError (one line) for a setting the probe cannot run with, before anything is collected."""
    game_labels(cfg.game)
    for key, low in (("frames", 1), ("seed", 0), ("min_episode_length", 0), ("probe.epochs", 1),
                     ("probe.batch_size", 1), ("probe.patience", 1), ("probe.lr_patience", 0)):
        check_int(key, OmegaConf.select(cfg, key), low)
    check_nonnegative("entropy_threshold", cfg.entropy_threshold)
    check_positive("probe.lr", cfg.probe.lr)
    check_bool("progress", cfg.progress)
    if cfg.torch_threads is not None:
        check_int("torch_threads", cfg.torch_threads, 1)
    probed = len(paths(cfg, "encoder")) + len(paths(cfg, "agent"))
    if cfg.name is not None and probed != 1:
        raise ValueError(f"name= names the one probed encoder; this run probes {probed} (encoder= and agent=): "
                         "leave name= out to name each by its loss (agent-<aux> for agents)")


def paths(cfg: DictConfig, key: str) -> list[str]:
    """The run dirs of encoder= or agent=: none, one, or a list ([a,b]) to probe side by side."""
    value = cfg[key]
    if value is None:
        return []
    found = list(value) if OmegaConf.is_list(value) else [value]
    if not found or not all(isinstance(path, str) and path for path in found):
        raise ValueError(f"{key}={value} must be a run dir or a list of run dirs ({key}=[dir_a,dir_b])")
    return found


def method_names(named: list[tuple[str, str]], name: str | None = None) -> list[str]:
    """The columns of probed encoders given as (run dir, its loss or agent-<aux>): `name` for a single one; a name
    that repeats (or is a baseline's) gets its run dir's folder name after it. ValueError if two still collide."""
    counts = Counter(base for _, base in named)
    columns: list[str] = []
    for path, base in named:
        column = name or (f"{base} ({Path(path).expanduser().resolve().name})"
                          if counts[base] > 1 or base in BASELINES else base)  # fmt: skip
        if column in columns or column in BASELINES:
            raise ValueError(f"two probed encoders are both called {column!r} (one is {path}): probe them in "
                             "separate runs")
        columns.append(column)
    return columns


def encoders(cfg: DictConfig) -> dict[str, tuple[str | None, Encoder]]:
    """Method name -> (the run dir it comes from, encoder): the random CNN, then the pretrained backbones and agents
    asked for, named by method_names."""
    named = [(path, *pretrained(path, cfg.progress)) for path in paths(cfg, "encoder")]
    for path in paths(cfg, "agent"):
        aux, encoder = agent(path, cfg.game, cfg.progress)
        named.append((path, f"agent-{aux}", encoder))
    columns = method_names([(path, base) for path, base, _ in named], cfg.name)
    chosen: dict[str, tuple[str | None, Encoder]] = {"random-cnn": (None, random_cnn(cfg.seed, cfg.progress))}
    chosen.update({column: (path, encoder) for column, (path, _, encoder) in zip(columns, named)})
    return chosen


def method_result(predicted: np.ndarray, true: np.ndarray, labels: list[str], **extra: Any) -> dict[str, Any]:
    """A method's scores: per label, per category and for the game (summarize), with `extra` fields."""
    scores = label_scores(predicted, true, labels)
    return {**summarize(scores), "labels": scores, **extra}


def probe_encoder(encode: Encoder, episodes: Episodes, data: ProbeData, y: torch.Tensor, cfg: DictConfig,
                  source: str | None) -> dict[str, Any]:
    """Features of the train, validation and test frames (computed once each), the probes trained on them, and their
    test scores, with the run dir the encoder came from (`source`; None for the random CNN)."""
    rows = np.concatenate([data.train, data.val, data.test])
    started = time.time()
    features = encode(episodes, rows)
    parts = features.split([len(data.train), len(data.val), len(data.test)])
    feature_seconds = time.time() - started
    settings = ProbeSettings(**OmegaConf.to_container(cfg.probe))
    probes, epochs = train_probes((parts[0], y[data.train], episodes.episode[data.train]), (parts[1], y[data.val]),
                                  settings, cfg.seed, cfg.progress)  # fmt: skip
    predicted = probes.predict(parts[2]).numpy()
    return method_result(predicted, y[data.test].numpy(), data.labels, epochs=dict(zip(data.labels, epochs.tolist())),
                         feature_seconds=feature_seconds, probe_seconds=time.time() - started - feature_seconds,
                         source=source)


def probe(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """One game's probes for the baselines and the encoders of cfg; writes probe.json and table.md to out_dir and
    returns the results."""
    check_config(cfg)
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    chosen = encoders(cfg)  # a bad encoder= or agent= is refused before the frames are collected
    started = time.time()
    episodes = load_or_collect(cfg.game, cfg.frames, cfg.seed, cfg.cache_dir, cfg.progress)
    data = prepare(episodes, cfg.seed, cfg.min_episode_length, cfg.entropy_threshold)
    if not data.labels:
        raise ValueError(f"no label of {cfg.game} has an entropy >= entropy_threshold={cfg.entropy_threshold} over "
                         f"{cfg.frames} frames; collect more frames")
    if len(data.test) == 0:
        raise ValueError(f"every test frame of {cfg.game} also occurs in train or validation; collect more frames")
    y = torch.from_numpy(episodes.labels[:, [episodes.label_names.index(n) for n in data.labels]].astype(np.int64))
    results = {"majority": method_result(majority_predictions(y[data.train].numpy(), len(data.test)),
                                         y[data.test].numpy(), data.labels)}  # fmt: skip
    data_seconds = time.time() - started
    for method, (source, encode) in chosen.items():
        results[method] = probe_encoder(encode, episodes, data, y, cfg, source)
    summary = {
        "game": cfg.game, "config": OmegaConf.to_container(cfg, resolve=True),
        "data": {"frames": len(episodes), "episodes": data.episodes,
                 "rows": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                 "test_duplicates_removed": data.duplicates, "labels": data.labels,
                 "dropped_labels": sorted(set(episodes.label_names) - set(data.labels)), "entropy": data.entropy,
                 "seconds": data_seconds},
        "methods": results, "seconds": time.time() - started,
    }  # fmt: skip
    out = Path(out_dir)
    atomic_write_all([(out / "table.md", lambda tmp: Path(tmp).write_text(markdown(summary))),
                      (out / "probe.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))])
    return summary


def table(rows: dict[str, dict[str, float]], methods: list[str], first: str) -> list[str]:
    """A markdown table: one row per key of `rows` (row name -> method -> value), one column per method."""
    lines = [f"| {first} | {' | '.join(methods)} |", f"|---|{'---|' * len(methods)}"]
    for name, values in rows.items():
        lines.append(f"| {name} | {' | '.join(f'{values[m]:.2f}' if m in values else '' for m in methods)} |")
    return lines


def markdown(summary: dict[str, Any]) -> str:
    """table.md: the data's numbers, then F1 and accuracy per category with the game's mean of the categories (the
    paper's Table 3 layout, and its Table 2 number in the last row), then F1 per label (its appendix's layout)."""
    methods, data, game = list(summary["methods"]), summary["data"], summary["game"]
    results = summary["methods"]
    lines = [f"# AtariARI probes: {game}", "",
             f"{data['frames']} frames; episodes train/val/test {data['episodes']['train']}/{data['episodes']['val']}/"
             f"{data['episodes']['test']} ({data['rows']['train']}/{data['rows']['val']}/{data['rows']['test']} frames, "
             f"{data['test_duplicates_removed']} test frames also in train or val removed); labels dropped for "
             f"entropy: {', '.join(data['dropped_labels']) or 'none'}.", ""]  # fmt: skip
    for metric, title in (("f1", "F1 (weighted)"), ("accuracy", "Accuracy")):
        rows = {category: {m: results[m]["categories"][category][metric] for m in methods
                           if category in results[m]["categories"]} for category in CATEGORIES}  # fmt: skip
        rows = {name: values for name, values in rows.items() if values}
        rows[f"**{game}** (mean of categories)"] = {m: results[m][metric] for m in methods}
        lines += [f"## {title} per category", "", *table(rows, methods, "category"), ""]
    per_label = {label: {m: results[m]["labels"][label]["f1"] for m in methods} for label in data["labels"]}
    lines += ["## F1 per label", "", *table(per_label, methods, "label"), ""]
    return "\n".join(lines)


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The probe's config with Hydra overrides, as the command line builds it (for scripts and tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config_dir("probe")), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run(cfg: DictConfig, out_dir: str) -> None:
    """`python -m minc_rl.probe`'s run in Hydra's run dir: a bad setting, encoder or agent is one line and exit code 2;
    prints the game's F1 per method."""
    try:
        summary = probe(cfg, out_dir)
    except (ValueError, FileNotFoundError) as error:
        fail(PROGRAM, one_line(error).split(": ", 1)[-1])
    scores = {method: round(result["f1"], 3) for method, result in summary["methods"].items()}
    print(json.dumps({"out_dir": str(out_dir), "game": cfg.game, "f1": scores}), file=sys.stdout, flush=True)
