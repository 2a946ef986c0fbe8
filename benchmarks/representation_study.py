"""The representation study's answer (issue 25): its pre-registered rule (README_representation_study.md, "What
counts") applied to each condition's report, and the arms' final return and health side by side across conditions.

    python benchmarks/representation_study.py      # after the report command of each condition (the README's)

Reads benchmarks/results/representation_study/<condition>/report/report.json (python -m minc_rl.report), and writes
summary.md (also printed), summary.json and summary.png beside the conditions. A condition whose report is missing,
or lacks a run of the grid (every game x arm x seed at the study's steps), gets no verdict: it is listed as
incomplete, with what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from minc_rl.common.io import atomic_write  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "representation_study"
CONDITIONS = ("clean_rr1", "clean_rr4", "distractors_rr1")
BASELINE, MINC_ARMS = "none", ("minc", "minc-sa")
GAMES = ("minatar:breakout", "minatar:space_invaders")
SEEDS = (0, 1, 2, 3, 4)
STEPS = 100_000  # the length rule's decision
SPLIT = "test"
NULL = "no difference these runs resolve"
PER_GAME = ("return", "srank", "dormant")  # the per-game table: the final value of each, against none's


def side(interval: list[float], reference: float) -> str:
    """Where a 95% interval lies with respect to `reference`: "above", "below" or "within" (touching is within)."""
    return "above" if interval[0] > reference else "below" if interval[1] < reference else "within"


def verdict(aggregate: dict[str, Any]) -> str:
    """The rule for one MINC arm in one condition: helps if the interval of P(arm > none) lies above 0.5 or that of
    the IQM difference above 0; hurts if one lies below; both at once, or neither: no difference resolved."""
    sides = {side(aggregate["probability_of_improvement_ci"], 0.5), side(aggregate["iqm_difference_ci"], 0.0)}
    helps, hurts = "above" in sides, "below" in sides
    return "helps" if helps and not hurts else "hurts" if hurts and not helps else NULL


def study_arms(report: dict[str, Any]) -> dict[str, str]:
    """The report's arm labels (e.g. "aux=minc aux.pairs=state_action aux.share=0.1") -> the study's arm names,
    which are the directory names of their runs (<condition>/minatar/<game>/<arm>/seed<k>)."""
    found: dict[str, set[str]] = {}
    for table in report["envs"].values():
        for label, row in table["arms"].items():
            found.setdefault(label, set()).update(Path(run).parent.name for run in row["runs"])
    for label, names in found.items():
        if len(names) != 1:
            raise ValueError(f"the report's arm {label!r} holds runs of several study arms ({', '.join(sorted(names))})")
    return {label: names.pop() for label, names in found.items()}


def missing(report: dict[str, Any], arms: dict[str, str]) -> list[str]:
    """What the condition lacks of the grid: '<game> <arm>: seeds ...' or '<game> <arm>: stopped at ... steps'."""
    by_arm = {(game, arms[label]): row for game, table in report["envs"].items() for label, row in table["arms"].items()}
    lacks = []
    for game in GAMES:
        for arm in (BASELINE, *MINC_ARMS):
            row = by_arm.get((game, arm), {"seeds": [], "steps": []})
            seeds = sorted(set(SEEDS) - set(row["seeds"]))
            if seeds:
                lacks.append(f"{game} {arm}: seeds {', '.join(map(str, seeds))}")
            elif row["steps"] != [STEPS]:
                lacks.append(f"{game} {arm}: runs end at {', '.join(f'{s:,}' for s in row['steps'])} steps, not {STEPS:,}")
    return lacks


def versus_none(game_rows: dict[str, dict[str, Any]], arm: str, metric: str) -> dict[str, float]:
    """An arm's final `metric` (the return or a health metric) minus none's on one game, with the combined SE."""
    value, base = (game_rows[name]["splits"][SPLIT] if metric == "return" else game_rows[name]["health"][metric]
                   for name in (arm, BASELINE))
    return {"difference": value["mean"] - base["mean"], "se": math.hypot(value["se"], base["se"])}


def per_game(report: dict[str, Any], arms: dict[str, str], arm: str) -> dict[str, dict[str, dict[str, float]]]:
    """game -> final return, srank and dormant fraction of one arm against none's (the rule's per-game table)."""
    result = {}
    for game in GAMES:
        rows = {arms[label]: row for label, row in report["envs"][game]["arms"].items()}
        result[game] = {metric: versus_none(rows, arm, metric) for metric in PER_GAME}
    return result


def health_claims(games: dict[str, dict[str, dict[str, float]]]) -> dict[str, bool]:
    """The rule's health claims for one arm: "keeps the rank up" if on both games its mean final srank exceeds
    none's by more than one combined SE; "keeps units alive" if its dormant fraction is below none's by as much."""
    return {
        "keeps_rank_up": all(g["srank"]["difference"] > g["srank"]["se"] for g in games.values()),
        "keeps_units_alive": all(g["dormant"]["difference"] < -g["dormant"]["se"] for g in games.values()),
    }


def strength(aggregate: dict[str, Any], games: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """What the rule says makes a verdict stronger: where each criterion's interval lies, and whether the games'
    return differences to none point the same way."""
    differences = [g["return"]["difference"] for g in games.values()]
    return {"probability_of_improvement": side(aggregate["probability_of_improvement_ci"], 0.5),
            "iqm_difference": side(aggregate["iqm_difference_ci"], 0.0),
            "games_agree": all(d > 0 for d in differences) or all(d < 0 for d in differences)}


def summarise_condition(report: dict[str, Any] | None) -> dict[str, Any]:
    """One condition: incomplete (with what is missing), or per MINC arm its verdict, intervals and health claims."""
    if report is None:
        return {"complete": False, "missing": ["no report (python -m minc_rl.report, README_representation_study.md)"]}
    arms = study_arms(report)
    lacks = missing(report, arms)
    if lacks:
        return {"complete": False, "missing": lacks}
    label = {name: label for label, name in arms.items()}
    result: dict[str, Any] = {"complete": True, "arms": {}}
    for arm in MINC_ARMS:
        aggregate = report["aggregate"]["arms"][label[arm]]
        games = per_game(report, arms, arm)
        result["arms"][arm] = {
            "verdict": verdict(aggregate),
            **{key: aggregate[key] for key in ("iqm", "iqm_ci", "iqm_difference", "iqm_difference_ci",
                                               "probability_of_improvement", "probability_of_improvement_ci")},
            "strength": strength(aggregate, games),
            "per_game": games,
            "health": health_claims(games),
        }
    return result


def per_arm_values(report: dict[str, Any]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """game -> study arm -> {"return", "srank", "dormant"}: (mean, SE) over seeds, for the figure."""
    arms = study_arms(report)
    values: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    for game, table in report["envs"].items():
        for label, row in table["arms"].items():
            entry = {"return": (row["splits"][SPLIT]["mean"], row["splits"][SPLIT]["se"])}
            entry.update({m: (row["health"][m]["mean"], row["health"][m]["se"]) for m in ("srank", "dormant") if m in row["health"]})
            values.setdefault(game, {})[arms[label]] = entry
    return values


def figure(reports: dict[str, dict[str, Any]]) -> Figure:
    """Per game (rows) the final return, srank and dormant fraction (columns) of each arm in each condition, mean ±
    SE over seeds (incomplete conditions too, with the seeds they have)."""
    values = {condition: per_arm_values(report) for condition, report in reports.items()}
    panels = ("return", "srank", "dormant")
    fig, axes = plt.subplots(len(GAMES), len(panels), figsize=(4.2 * len(panels), 3.2 * len(GAMES)), squeeze=False)
    arms = (BASELINE, *MINC_ARMS)
    for row, game in enumerate(GAMES):
        for col, metric in enumerate(panels):
            ax = axes[row][col]
            for k, arm in enumerate(arms):
                points = [(i, values[c][game][arm][metric]) for i, c in enumerate(CONDITIONS)
                          if c in values and arm in values[c].get(game, {}) and metric in values[c][game][arm]]
                if points:
                    x = np.array([i for i, _ in points]) + (k - 1) * 0.12
                    means, ses = zip(*(value for _, value in points))
                    ax.errorbar(x, means, yerr=[0.0 if s is None else s for s in ses], fmt="o", capsize=3, label=arm)  # one seed: no SE
            ax.set_xticks(range(len(CONDITIONS)), CONDITIONS)
            ax.set_xlim(-0.5, len(CONDITIONS) - 0.5)
            ax.set_title(f"{game}: final {metric}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(title="arm", fontsize=8)
    fig.tight_layout()
    return fig


def fmt_interval(point: float, interval: list[float]) -> str:
    """'0.95 [0.80, 1.10]'."""
    return f"{point:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def markdown(summary: dict[str, Any]) -> str:
    """summary.md: the verdict table, the health claims and the incomplete conditions."""
    lines = ["# The representation study: the rule applied (README_representation_study.md, \"What counts\")", "",
             "| condition | arm | IQM - IQM(none) [95% CI] | P(arm > none) [95% CI] | verdict | intervals (IQM diff vs 0, P vs 0.5) "
             "| games agree |", "|---|---|---|---|---|---|---|"]
    health = ["| condition | arm | game | return - none's | srank - none's | dormant - none's |", "|---|---|---|---|---|---|"]
    claims, incomplete = [], []
    for condition, result in summary.items():
        if not result["complete"]:
            incomplete.append(f"- {condition}: incomplete, no verdict ({'; '.join(result['missing'])})")
            continue
        for arm, value in result["arms"].items():
            how = value["strength"]
            lines.append(f"| {condition} | {arm} | {fmt_interval(value['iqm_difference'], value['iqm_difference_ci'])} | "
                         f"{fmt_interval(value['probability_of_improvement'], value['probability_of_improvement_ci'])} | "
                         f"{value['verdict']} | IQM diff {how['iqm_difference']}, P {how['probability_of_improvement']} | "
                         f"{'yes' if how['games_agree'] else 'no'} |")
            for game, metrics in value["per_game"].items():
                health.append(f"| {condition} | {arm} | {game} | " + " | ".join(
                    f"{metrics[m]['difference']:+.3f} ± {metrics[m]['se']:.3f}" for m in PER_GAME) + " |")
            said = [text for key, text in (("keeps_rank_up", "keeps the features' rank up"),
                                           ("keeps_units_alive", "keeps units alive")) if value["health"][key]]
            claims.append(f"- {condition}, {arm}: {', '.join(said) if said else 'neither health claim holds'}")
    if claims:
        text = "\n".join(lines) + (
            "\n\n(A verdict is stronger when both intervals lie on the same side and both games point the same way:"
            " README_representation_study.md, \"What counts\".)\n\n"
            "## Per game against none's: final return and health (mean difference ± combined SE over seeds)\n\n")
        text += "\n".join(health) + "\n\nHealth claims (on both games, beyond one combined SE):\n\n" + "\n".join(claims)
    else:
        text = lines[0] + "\n\nNo condition is complete yet."
    if incomplete:
        text += "\n\n## Not yet judged\n\n" + "\n".join(incomplete)
    return text + "\n"


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the study's result dir (one subdir per condition)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results}: no such directory (it holds one subdirectory per condition)")
    reports = {}
    for condition in CONDITIONS:
        path = args.results / condition / "report" / "report.json"
        if path.is_file():
            reports[condition] = json.loads(path.read_text())
    summary = {condition: summarise_condition(reports.get(condition)) for condition in CONDITIONS}
    text = markdown(summary) + ("\n![final return and health per condition](summary.png)\n" if reports else "")
    atomic_write(args.results / "summary.md", lambda tmp: Path(tmp).write_text(text))
    atomic_write(args.results / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    if reports:
        fig = figure(reports)
        atomic_write(args.results / "summary.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)
    print(text)
    print(f"wrote summary.md, summary.json{', summary.png' if reports else ''} to {args.results}")


if __name__ == "__main__":
    main()
