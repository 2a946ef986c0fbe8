"""The positive control's answer (issue 39): README_selfpred_replication.md's rule ("What counts") applied to the
committed runs: the two manipulation checks, stage 1 (self-prediction against DQN) and, once its runs exist,
stage 2 (MINC as the self-prediction loss, with and without a target network).

    python benchmarks/selfpred_replication.py      # any time: an arm with unfinished runs gets no verdict yet

Reads benchmarks/results/selfpred_replication/minatar/space_invaders/<arm>/seed<k>/ (rl_evidence.py's committed
copies) and writes summary.md (also printed) and summary.json beside them. The comparisons are those of
`python -m minc_rl.report` (minc_rl.runs.report.analyse: final return = mean of the last 3 evaluations, normalised by
the baseline arm's mean, IQM difference with its 95% stratified-bootstrap interval, 2,000 resamples, seed 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from minc_rl.common.io import atomic_write
from minc_rl.runs.report import Run, analyse, arm_keys, arm_label, load_run, mean_and_se
from representation_study import NULL, side  # the house's reading of an interval

RESULTS = Path(__file__).parent / "results" / "selfpred_replication"
GAME = Path("minatar") / "space_invaders"
STEPS, LAST, REPS, SEED, SPLIT = 250_000, 3, 2000, 0, "test"
SEEDS, CHECK_SEEDS = tuple(range(10)), (0, 1, 2)
NOISE_COST = 0.75  # check 1: none's final return at most this share of none-clean's
LEARNING_STARTS, WINDOW, FALLING_RUNS = 5_000, 25_000, 8  # check 2: the latent loss's first and last 25,000 steps
COLLAPSE_RANK = 5.0  # stage 2: the predictions' final RankMe below this in at least half the runs
LATENT_LOSS, RANKME = "train/aux_latent_loss", "train/aux_rankme"
STAGE2 = ("minc-sg", "minc-free")


def finished_runs(results: Path, arm: str, seeds: tuple[int, ...]) -> tuple[dict[int, Run], list[str]]:
    """The arm's runs of `seeds` that reached STEPS, and what is missing of them ('<arm>: seeds ...')."""
    runs, lacking = {}, []
    for seed in seeds:
        folder = results / GAME / arm / f"seed{seed}"
        run = load_run(folder) if (folder / "evaluations.csv").is_file() else None
        if run is not None and len(run.evaluations) and int(run.evaluations["step"].iloc[-1]) >= STEPS:
            runs[seed] = run
        else:
            lacking.append(seed)
    return runs, [f"{arm}: seeds {', '.join(map(str, lacking))} not finished"] if lacking else []


def noise_costs(none: dict[int, Run], clean: dict[int, Run]) -> dict[str, Any]:
    """Check 1: the ratio of none's mean final return to none-clean's (seeds 0-2); passed at most NOISE_COST."""
    noisy, plain = (float(np.mean([run.final_return(SPLIT, LAST) for run in runs.values()])) for runs in (none, clean))
    ratio = noisy / plain if plain > 0 else float("nan")
    return {"none": noisy, "none_clean": plain, "ratio": ratio, "passed": bool(ratio <= NOISE_COST)}


def loss_falls(run: Run) -> bool:
    """Whether the latent loss's mean over the last WINDOW steps is below its mean over the first WINDOW after
    learning starts."""
    steps, values = run.progress_curve(LATENT_LOSS)
    first = values[(steps >= LEARNING_STARTS) & (steps <= LEARNING_STARTS + WINDOW)]
    last = values[steps > STEPS - WINDOW]
    if not len(first) or not len(last):
        raise ValueError(f"{run.path}: progress.csv logs {LATENT_LOSS} in neither the first nor the last {WINDOW:,} "
                         "steps; the check needs both")
    return bool(last.mean() < first.mean())


def final_rankme(run: Run) -> float:
    """The predictions' RankMe at the run's last logged update."""
    steps, values = run.progress_curve(RANKME)
    if not len(values):
        raise ValueError(f"{run.path}: progress.csv has no {RANKME}")
    return float(values[-1])


def compare(runs: dict[int, Run], baseline: dict[int, Run]) -> dict[str, Any]:
    """minc_rl.report's comparison of two arms: means +- SE of the final returns, the IQM difference (arm -
    baseline) with its 95% interval, and P(arm > baseline) with its interval."""
    both = [*baseline.values(), *runs.values()]
    spec = arm_label(next(iter(baseline.values())).settings, arm_keys(both)).split()
    result = analyse(both, baseline=spec, last=LAST, normalise="baseline", reps=REPS, seed=SEED)
    arm = next(label for label in result["aggregate"]["arms"] if label != result["baseline"])
    aggregate = result["aggregate"]["arms"][arm]
    means = {name: mean_and_se([r.final_return(SPLIT, LAST) for r in group.values()])
             for name, group in (("arm", runs), ("baseline", baseline))}  # fmt: skip
    return {"final_return": means["arm"], "baseline_final_return": means["baseline"],
            **{key: aggregate[key] for key in ("iqm_difference", "iqm_difference_ci", "probability_of_improvement",
                                               "probability_of_improvement_ci")}}  # fmt: skip


def stage2_arm(runs: dict[int, Run], none: dict[int, Run], selfpred: dict[int, Run]) -> dict[str, Any]:
    """One MINC arm: helps / hurts against none, matches / beats / falls short of selfpred, and whether it collapsed."""
    versus_none, versus_selfpred = compare(runs, none), compare(runs, selfpred)
    against_none = side(versus_none["iqm_difference_ci"], 0.0)
    against_selfpred = side(versus_selfpred["iqm_difference_ci"], 0.0)
    ranks = {seed: final_rankme(run) for seed, run in runs.items()}
    return {"versus_none": versus_none, "versus_selfpred": versus_selfpred,
            "against_none": {"above": "helps", "below": "hurts", "within": NULL}[against_none],
            "against_selfpred": {"above": "beats", "below": "falls short", "within": "matches"}[against_selfpred],
            "final_rankme": ranks, "collapsed": sum(rank < COLLAPSE_RANK for rank in ranks.values()) >= len(ranks) / 2}


def summarise(results: Path) -> dict[str, Any]:
    """The rule applied to what `results` holds; a part whose runs are not all finished lists what is missing."""
    none, lack_none = finished_runs(results, "none", SEEDS)
    selfpred, lack_selfpred = finished_runs(results, "selfpred", SEEDS)
    none_checked, lack_none_checked = finished_runs(results, "none", CHECK_SEEDS)
    clean, lack_clean = finished_runs(results, "none-clean", CHECK_SEEDS)
    summary: dict[str, Any] = {"results": str(results)}
    lacking = lack_none_checked + lack_clean
    summary["noise_check"] = {"missing": lacking} if lacking else noise_costs(none_checked, clean)
    if lack_selfpred:
        summary["falling_check"] = {"missing": lack_selfpred}
    else:
        falls = {seed: loss_falls(run) for seed, run in selfpred.items()}
        summary["falling_check"] = {"falls": falls, "passed": sum(falls.values()) >= FALLING_RUNS}
    if lack_none or lack_selfpred:
        summary["stage1"] = {"missing": lack_none + lack_selfpred}
        return summary
    stage1 = compare(selfpred, none)
    stage1["reproduced"] = side(stage1["iqm_difference_ci"], 0.0) == "above"
    summary["stage1"] = stage1
    summary["stage2"] = {}
    for arm in STAGE2:
        runs, lacking = finished_runs(results, arm, SEEDS)
        summary["stage2"][arm] = {"missing": lacking} if lacking else stage2_arm(runs, none, selfpred)
    minc_free = summary["stage2"]["minc-free"]
    if "missing" not in minc_free:
        summary["stage2"]["poster_claim_holds"] = not minc_free["collapsed"] and \
            minc_free["against_selfpred"] != "falls short"  # fmt: skip
    return summary


def interval_text(point: float, interval: list[float] | None) -> str:
    """A point estimate with its 95% interval."""
    return f"{point:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else f"{point:+.3f} (no interval)"


def comparison_line(name: str, result: dict[str, Any], verdict: str) -> str:
    """A markdown table row of one comparison."""
    arm, base = result["final_return"], result["baseline_final_return"]
    return (f"| {name} | {arm[0]:.2f} +- {arm[1]:.2f} | {base[0]:.2f} +- {base[1]:.2f} | "
            f"{interval_text(result['iqm_difference'], result['iqm_difference_ci'])} | "
            f"{interval_text(result['probability_of_improvement'], result['probability_of_improvement_ci'])} | "
            f"{verdict} |")


def markdown(summary: dict[str, Any]) -> str:
    """summary.md: the checks, then the stages, each with its verdict or what it still lacks."""
    lines = ["# The positive control (issue 39): the rule applied", "",
             "Rule: benchmarks/README_selfpred_replication.md, \"What counts\". Final return: the mean of the last 3 "
             "evaluations; IQM difference normalised by the baseline arm's mean final return.", "",
             "## Manipulation checks", ""]  # fmt: skip
    noise, falling = summary["noise_check"], summary["falling_check"]
    if "missing" in noise:
        lines.append(f"- Noise costs DQN >= 25%: not yet ({'; '.join(noise['missing'])}).")
    else:
        lines.append(f"- Noise costs DQN >= 25%: none {noise['none']:.2f} / none-clean {noise['none_clean']:.2f} = "
                     f"{noise['ratio']:.2f} (passed if <= {NOISE_COST}): **{'passed' if noise['passed'] else 'failed'}**.")
    if "missing" in falling:
        lines.append(f"- The latent loss falls: not yet ({'; '.join(falling['missing'])}).")
    else:
        count = sum(falling["falls"].values())
        lines.append(f"- The latent loss falls: in {count} of {len(falling['falls'])} selfpred runs (passed if >= "
                     f"{FALLING_RUNS}): **{'passed' if falling['passed'] else 'failed'}**.")
    header = ["| comparison | final return | baseline's | IQM difference [95%] | P(arm > baseline) [95%] | verdict |",
              "|---|---|---|---|---|---|"]
    lines += ["", "## Stage 1: self-prediction against DQN", ""]
    stage1 = summary["stage1"]
    if "missing" in stage1:
        lines.append(f"Not yet: {'; '.join(stage1['missing'])}.")
        return "\n".join(lines) + "\n"
    lines += [*header, comparison_line("selfpred vs none", stage1,
                                       "reproduced" if stage1["reproduced"] else "not reproduced")]  # fmt: skip
    lines += ["", "## Stage 2: MINC as the self-prediction loss", ""]
    stage2 = summary["stage2"]
    rows = []
    for arm in STAGE2:
        entry = stage2[arm]
        if "missing" in entry:
            lines.append(f"- {arm}: not yet ({'; '.join(entry['missing'])}).")
            continue
        collapse = "collapsed" if entry["collapsed"] else "no collapse"
        rows += [comparison_line(f"{arm} vs none", entry["versus_none"], f"{entry['against_none']}; {collapse}"),
                 comparison_line(f"{arm} vs selfpred", entry["versus_selfpred"], entry["against_selfpred"])]
    if rows:
        lines += ["", *header, *rows]
    if "poster_claim_holds" in stage2:
        lines += ["", f"The poster's claim in RL (minc-free neither collapses nor falls short of selfpred): "
                      f"**{'holds' if stage2['poster_claim_holds'] else 'does not hold'}**."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Apply the rule and write summary.md and summary.json into the results folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the replication's committed runs")
    args = parser.parse_args(argv)
    if not (args.results / GAME).is_dir():
        parser.error(f"--results {args.results} holds no {GAME} folder of runs")
    try:
        summary = summarise(args.results)
    except ValueError as error:
        parser.error(str(error))
    text = markdown(summary)
    atomic_write(args.results / "summary.md", lambda tmp: Path(tmp).write_text(text))
    atomic_write(args.results / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(text, flush=True)


if __name__ == "__main__":
    main()
