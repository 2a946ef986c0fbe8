"""The representation study's rule (benchmarks/README_representation_study.md, "What counts") as
benchmarks/representation_study.py applies it, on hand-built reports whose verdicts and health claims are known."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import representation_study as study  # noqa: E402

LABELS = {"none": "aux=none", "minc": "aux=minc aux.pairs=state", "minc-sa": "aux=minc aux.pairs=state_action"}


def arm_row(game: str, arm: str, srank: float, dormant: float, seeds=study.SEEDS, steps=study.STEPS,
            final: float = 1.0) -> dict:
    """One arm's row of a report.json env table: runs in <arm>/seed<k> dirs, final return SE 0.1, health SE 1 and
    0.01."""
    return {"seeds": list(seeds), "steps": [steps], "runs": [f"/r/clean_rr1/{game}/{arm}/seed{s}" for s in seeds],
            "splits": {"test": {"mean": final, "se": 0.1}},
            "health": {"srank": {"mean": srank, "se": 1.0}, "dormant": {"mean": dormant, "se": 0.01}}}


def aggregate(p_ci: list[float], gap_ci: list[float]) -> dict:
    """An arm's aggregate entry with the given intervals (points at their middles)."""
    return {"iqm": 1.0, "iqm_ci": [0.9, 1.1], "probability_of_improvement": sum(p_ci) / 2,
            "probability_of_improvement_ci": p_ci, "iqm_difference": sum(gap_ci) / 2, "iqm_difference_ci": gap_ci}


def report(health: dict[str, dict[str, tuple[float, ...]]] | None = None, **rows) -> dict:
    """A complete condition's report: every arm at final return 1, srank 40, dormant 0.30 on both games unless
    `health` (game -> arm -> (srank, dormant[, final return])) says otherwise; `rows` replaces whole rows by (game,
    arm) key 'game__arm'."""
    envs = {}
    for game in study.GAMES:
        arms = {}
        for arm, label in LABELS.items():
            srank, dormant, *final = (health or {}).get(game, {}).get(arm, (40.0, 0.30))
            arms[label] = rows.get(f"{game}__{arm}", arm_row(game, arm, srank, dormant, final=(final or [1.0])[0]))
        envs[game] = {"splits": ["test"], "arms": arms}
    return {"envs": envs, "aggregate": {"arms": {LABELS["none"]: {"iqm": 1.0, "iqm_ci": [0.9, 1.1]},
                                                 LABELS["minc"]: aggregate([0.55, 0.9], [-0.1, 0.2]),
                                                 LABELS["minc-sa"]: aggregate([0.2, 0.6], [-0.3, 0.1])}}}


@pytest.mark.parametrize("p_ci, gap_ci, expected", [
    ([0.55, 0.90], [-0.10, 0.20], "helps"),        # P's interval above 0.5
    ([0.40, 0.80], [0.01, 0.30], "helps"),         # the IQM difference's above 0
    ([0.10, 0.45], [-0.20, 0.10], "hurts"),        # P's below 0.5
    ([0.30, 0.60], [-0.30, -0.01], "hurts"),       # the difference's below 0
    ([0.55, 0.90], [-0.30, -0.01], study.NULL),    # the two criteria disagree
    ([0.50, 0.90], [0.00, 0.30], study.NULL),      # touching 0.5 and 0 is not above them
    ([0.30, 0.70], [-0.10, 0.10], study.NULL),
])
def test_the_verdict_follows_the_written_rule(p_ci, gap_ci, expected):
    assert study.verdict(aggregate(p_ci, gap_ci)) == expected


def test_a_complete_condition_gets_verdicts_and_health_claims_against_none():
    """minc: srank 43 and 42 against 40 (SE sqrt 2 = 1.41): +3 beyond it, +2 beyond it -> rank up; dormant 0.28 and
    0.25 against 0.30 (SE 0.0141): both below -> units alive. minc-sa: srank +3 on breakout but +1 on space_invaders
    (within one SE) -> no rank claim; dormant +0.05 -> no units claim. Final returns against none's 1: minc 1.2 and
    0.9 (the games disagree), minc-sa 0.8 and 0.7 (both below)."""
    breakout, invaders = study.GAMES
    health = {breakout: {"minc": (43.0, 0.28, 1.2), "minc-sa": (43.0, 0.35, 0.8)},
              invaders: {"minc": (42.0, 0.25, 0.9), "minc-sa": (41.0, 0.35, 0.7)}}
    result = study.summarise_condition(report(health))
    assert result["complete"]
    minc, minc_sa = result["arms"]["minc"], result["arms"]["minc-sa"]
    assert minc["verdict"] == "helps" and minc_sa["verdict"] == study.NULL
    assert minc["probability_of_improvement_ci"] == [0.55, 0.9] and minc["iqm_difference"] == pytest.approx(0.05)
    srank = minc["per_game"][invaders]["srank"]
    assert srank["difference"] == pytest.approx(2.0) and srank["se"] == pytest.approx(math.sqrt(2))
    assert minc["per_game"][breakout]["dormant"]["difference"] == pytest.approx(-0.02)
    final = minc["per_game"][breakout]["return"]
    assert final["difference"] == pytest.approx(0.2) and final["se"] == pytest.approx(0.1 * math.sqrt(2))
    assert minc["strength"] == {"probability_of_improvement": "above", "iqm_difference": "within", "games_agree": False}
    assert minc_sa["strength"] == {"probability_of_improvement": "within", "iqm_difference": "within", "games_agree": True}
    assert minc["health"]["keeps_rank_up"] and minc["health"]["keeps_units_alive"]
    assert not minc_sa["health"]["keeps_rank_up"] and not minc_sa["health"]["keeps_units_alive"]


def test_a_condition_missing_runs_or_steps_gets_no_verdict_and_says_what_is_missing():
    breakout, invaders = study.GAMES
    short = report(**{f"{breakout}__minc-sa": arm_row(breakout, "minc-sa", 40.0, 0.3, seeds=(0, 1, 3)),
                      f"{invaders}__none": arm_row(invaders, "none", 40.0, 0.3, steps=50_000)})
    result = study.summarise_condition(short)
    assert not result["complete"] and "arms" not in result
    assert result["missing"] == [f"{breakout} minc-sa: seeds 2, 4",
                                 f"{invaders} none: runs end at 50,000 steps, not 100,000"]
    assert not study.summarise_condition(None)["complete"]


def test_an_arm_label_holding_two_study_arms_is_refused():
    mixed = report()
    row = mixed["envs"][study.GAMES[0]]["arms"][LABELS["minc"]]
    row["runs"][0] = row["runs"][0].replace("/minc/", "/minc-sa/")
    with pytest.raises(ValueError, match="several study arms"):
        study.study_arms(mixed)


def test_the_command_writes_the_summary_of_the_conditions_it_finds(tmp_path, capsys):
    (tmp_path / "clean_rr4" / "report").mkdir(parents=True)
    (tmp_path / "clean_rr4" / "report" / "report.json").write_text(json.dumps(report()))
    study.main(["--results", str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    assert "| clean_rr4 | minc | 0.05 [-0.10, 0.20] | 0.73 [0.55, 0.90] | helps | IQM diff within, P above | no |" in text
    assert (f"| clean_rr4 | minc-sa | -0.10 [-0.30, 0.10] | 0.40 [0.20, 0.60] | {study.NULL} | IQM diff within, "
            "P within | no |") in text
    assert f"| clean_rr4 | minc | {study.GAMES[0]} | +0.000 ± 0.141 | +0.000 ± 1.414 | +0.000 ± 0.014 |" in text
    assert "- clean_rr1: incomplete, no verdict (no report" in text and "summary.png" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["clean_rr4"]["arms"]["minc"]["verdict"] == "helps" and not summary["distractors_rr1"]["complete"]
    assert (tmp_path / "summary.png").stat().st_size > 0 and text in capsys.readouterr().out


def test_a_results_directory_that_is_not_there_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        study.main(["--results", str(tmp_path / "nowhere")])
    assert stopped.value.code == 2 and not (tmp_path / "nowhere").exists()  # it wrote an "incomplete" summary there
    assert f"--results {tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err
