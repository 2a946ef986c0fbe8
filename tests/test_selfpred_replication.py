"""The positive control's rule (benchmarks/README_selfpred_replication.md, "What counts") as
benchmarks/selfpred_replication.py applies it, on hand-built run dirs whose checks and verdicts are known."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from minc_rl.runs import run_io

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import selfpred_replication as replication  # noqa: E402

ARMS = {  # the settings that tell the arms apart, as rl_evidence.py's replication grid sets them
    "none": {"aux": {"name": "none"}},
    "none-clean": {"aux": {"name": "none"}, "env_options": {"distractors": {"channels": 0}}},
    "selfpred": {"aux": {"name": "selfpred", "latent_loss": "mse", "target": "q_target"}},
    "minc-sg": {"aux": {"name": "selfpred", "latent_loss": "minc", "target": "q_target"}},
    "minc-free": {"aux": {"name": "selfpred", "latent_loss": "minc", "target": "none"}},
}


def write_run(results: Path, arm: str, seed: int, final: float, falls: bool = True, rankme: float = 50.0,
              steps: int = 250_000) -> None:
    """A committed run: 20 evaluations to `steps` whose last three average to `final`, and progress.csv with the
    latent loss (1.0 in steps 5,000-30,000, then 0.5 or, if not `falls`, 2.0) and the predictions' RankMe."""
    folder = results / "minatar" / "space_invaders" / arm / f"seed{seed}"
    folder.mkdir(parents=True)
    config = {"env": "minatar:space_invaders", "seed": seed, "agent": {"name": "dqn"}, **ARMS[arm]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    for step in range(steps // 20, steps + 1, steps // 20):
        value = final + {steps - 2 * steps // 20: -1.0, steps - steps // 20: 0.0, steps: 1.0}.get(step, -final)
        run_io.append_evaluation(folder / "evaluations.csv", dict(step=step, split="test", return_mean=value,
                                                                  return_std=0.0, length_mean=10.0, episodes=10))
    later = 0.5 if falls else 2.0
    rows = [f"{step},{1.0 if step <= 30_000 else later},{rankme}" for step in range(5_000, steps + 1, 5_000)]
    (folder / "progress.csv").write_text("time/total_timesteps,train/aux_latent_loss,train/aux_rankme\n"
                                         + "\n".join(rows) + "\n")  # fmt: skip
    run_io.write_summary(folder / "summary.json", {"steps": steps, "interrupted": False, "health": {}})


def test_a_part_whose_runs_are_unfinished_gets_no_verdict_and_says_what_is_missing(tmp_path):
    for seed in range(10):
        write_run(tmp_path, "none", seed, 10.0)
    for seed in range(4):
        write_run(tmp_path, "selfpred", seed, 12.0)
    write_run(tmp_path, "selfpred", 4, 12.0, steps=125_000)  # stopped half way: not finished
    summary = replication.summarise(tmp_path)
    assert summary["stage1"] == {"missing": ["selfpred: seeds 4, 5, 6, 7, 8, 9 not finished"]}
    assert summary["noise_check"] == {"missing": ["none-clean: seeds 0, 1, 2 not finished"]}
    assert summary["falling_check"] == summary["stage1"]
    text = replication.markdown(summary)
    assert "Not yet: selfpred: seeds 4, 5, 6, 7, 8, 9 not finished." in text and "Stage 2" not in text


def test_the_checks_and_both_stages_follow_the_written_rule(tmp_path, monkeypatch):
    """none 10 + 0.1 seed; selfpred 14 + 0.1 seed (reproduced), its loss falling in exactly 8 runs (passed);
    none-clean 20 on seeds 0-2 (ratio 10.1 / 20 <= 0.75: passed); minc-sg as selfpred (helps; matches it); minc-free
    at 8 + 0.1 seed with RankMe 3 in half its runs (hurts, falls short, collapsed: the poster's claim does not hold)."""
    for seed in range(10):
        write_run(tmp_path, "none", seed, 10 + 0.1 * seed)
        write_run(tmp_path, "selfpred", seed, 14 + 0.1 * seed, falls=seed < 8)
        write_run(tmp_path, "minc-sg", seed, 14 + 0.1 * seed)
        write_run(tmp_path, "minc-free", seed, 8 + 0.1 * seed, rankme=3.0 if seed % 2 else 40.0)
    for seed in range(3):
        write_run(tmp_path, "none-clean", seed, 20.0)
    monkeypatch.setattr(replication, "REPS", 200)  # the rule's 2,000 resamples cost a minute; these cases are clear
    summary = replication.summarise(tmp_path)
    assert summary["noise_check"]["ratio"] == pytest.approx(10.1 / 20) and summary["noise_check"]["passed"]
    assert summary["falling_check"]["falls"] == {seed: seed < 8 for seed in range(10)}
    assert summary["falling_check"]["passed"]
    stage1 = summary["stage1"]
    seeds_se = float(np.std(0.1 * np.arange(10), ddof=1) / np.sqrt(10))
    assert stage1["final_return"] == pytest.approx((14.45, seeds_se))
    assert stage1["baseline_final_return"] == pytest.approx((10.45, seeds_se))
    # normalised by none's mean 10.45: the IQM difference of the two arms' middle runs, (14.45 - 10.45) / 10.45
    assert stage1["iqm_difference"] == pytest.approx(4 / 10.45) and stage1["reproduced"]
    assert stage1["probability_of_improvement"] == pytest.approx(1.0)
    sg, free = summary["stage2"]["minc-sg"], summary["stage2"]["minc-free"]
    assert (sg["against_none"], sg["against_selfpred"], sg["collapsed"]) == ("helps", "matches", False)
    assert (free["against_none"], free["against_selfpred"], free["collapsed"]) == ("hurts", "falls short", True)
    assert summary["stage2"]["poster_claim_holds"] is False
    text = replication.markdown(summary)
    assert "in 8 of 10 selfpred runs (passed if >= 8): **passed**" in text
    assert "| selfpred vs none | 14.45 +- 0.10 | 10.45 +- 0.10 | +0.383 [" in text and "| reproduced |" in text
    assert "**does not hold**" in text


def test_a_run_without_the_latent_loss_is_named(tmp_path):
    for seed in range(10):
        write_run(tmp_path, "none", seed, 10.0)
        write_run(tmp_path, "selfpred", seed, 12.0)
    (tmp_path / "minatar" / "space_invaders" / "selfpred" / "seed3" / "progress.csv").write_text("time/total_timesteps\n5000\n")
    with pytest.raises(ValueError, match="selfpred/seed3: progress.csv logs train/aux_latent_loss in neither"):
        replication.summarise(tmp_path)


def test_the_command_writes_its_summary_and_refuses_a_folder_without_runs(tmp_path, capsys):
    write_run(tmp_path, "none", 0, 10.0)
    replication.main(["--results", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text())["stage1"]["missing"][0].startswith("none: seeds 1, 2")
    assert (tmp_path / "summary.md").read_text() == capsys.readouterr().out.rstrip("\n") + "\n"
    with pytest.raises(SystemExit) as refused:
        replication.main(["--results", str(tmp_path / "nothing")])
    assert refused.value.code == 2 and "holds no minatar/space_invaders folder of runs" in capsys.readouterr().err
