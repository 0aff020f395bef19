"""The decisions of issue #13's scripts, on hand-built summaries: the sensitivity study's selection rule
(benchmarks/pogdiff_sensitivity.py) and the confirmation's verdicts (benchmarks/pogdiff_confirmation.py)."""

import importlib.util
from pathlib import Path

import pytest


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study, confirmation = load_script("pogdiff_sensitivity"), load_script("pogdiff_confirmation")

SEEDS = [0, 1, 2]


def summary(rows: dict[str, tuple[float, float, int]]) -> dict:
    """rows: name -> (mean paired Few id_acc difference, mean paired Few sim difference, seeds done)."""
    def few(sim):
        return {"few": {"sim": {"mean": sim, "half_width": None, "n": 1}}}
    return {"calibration": {"real (held-out)": few(0.90), "real (look-alike)": few(0.80)},  # gap 0.1 -> bound -0.02
            "methods": {name: {"seeds": dict.fromkeys(range(n))} for name, (_, _, n) in rows.items()},
            "paired_vs_vanilla": {name: {"few.id_acc": {"mean": acc, "half_width": 0.1, "n": n},
                                         "few.sim": {"mean": sim, "half_width": 0.01, "n": n}}
                                  for name, (acc, sim, n) in rows.items()}}


def test_the_largest_id_acc_gain_within_the_sim_bound_is_chosen():
    grid = study.grid()
    rows = {name: (0.0, -0.05, 3) for name in grid}
    rows[grid[0]] = (0.30, -0.021, 3)  # best id_acc, but its images drift further than the bound
    rows[grid[1]] = (0.10, -0.019, 3)
    rows[grid[2]] = (0.10, 0.010, 3)   # same id_acc gain, better sim: wins the tie
    text = study.choose(summary(rows), SEEDS)
    assert f"Chosen: `{grid[2]}`" in text and "2 of them pass" in text
    assert "-0.020" in text and "least harmful" not in text


def test_incomplete_rows_are_left_out_and_a_choice_that_does_not_beat_vanilla_says_so():
    grid = study.grid()
    rows = {name: (-0.1, 0.0, 3) for name in grid}
    rows[grid[0]] = (0.5, 0.0, 1)      # one seed only: not ranked yet
    rows[grid[1]] = (-0.05, 0.0, 3)
    text = study.choose(summary(rows), SEEDS)
    assert "Provisional" in text and f"`{grid[1]}`" in text and "least harmful" in text
    assert "35 of 36 configurations" in text


def test_a_confirmation_verdict_is_a_win_or_loss_only_when_the_interval_excludes_zero():
    def difference(mean, half_width):
        return {"mean": mean, "half_width": half_width, "n": 3}
    assert confirmation.verdict(difference(0.10, 0.08)) == "win"
    assert confirmation.verdict(difference(-0.10, 0.08)) == "loss"
    assert confirmation.verdict(difference(0.10, 0.12)) == "tie"
    assert confirmation.verdict(difference(0.10, None)) == "–"  # one seed: no interval
    assert confirmation.verdict(None) == "–"


def test_the_confirmation_knows_whether_the_defaults_are_still_the_old_ones(monkeypatch):
    from pogdiff.objectives.losses import method_parameters

    k = method_parameters("pogdiff")["k"].default
    monkeypatch.setattr(confirmation, "OLD_DEFAULTS", f"pogdiff:k={k},use_psi_img=true")
    assert not confirmation.defaults_were_changed()
    monkeypatch.setattr(confirmation, "OLD_DEFAULTS", f"pogdiff:k={k + 1},use_psi_img=true")
    assert confirmation.defaults_were_changed()


def test_fewer_seeds_than_the_study_never_choose():
    rows = {name: (0.1, 0.0, 1) for name in study.grid()}
    text = study.choose(summary(rows), [0])
    assert "Provisional (seeds 0, not the study's 0, 1, 2)" in text and "Chosen" not in text


def test_the_confirmation_pairs_pogdiff_on_balanced_rows_with_resample_seed_by_seed():
    def cells(*few_id_acc):
        return {"seeds": {seed: {"all": {}, "few": {"id_acc": v, "sim": 0.5}} for seed, v in enumerate(few_id_acc)}}
    difference = confirmation.same_rows_difference({"pogdiff+balanced": cells(0.6, 0.7, 0.5),
                                                    "resample": cells(0.7, 0.7, 0.9), "vanilla": cells(0, 0, 0)})
    few = difference["few.id_acc"]
    assert few["baseline"] == "resample" and few["per_seed"] == pytest.approx({0: -0.1, 1: 0.0, 2: -0.4})
    assert few["mean"] == pytest.approx(-0.5 / 3) and difference["few.sim"]["mean"] == 0
    assert confirmation.same_rows_difference({"resample": cells(0.7)}) == {}  # not run yet
