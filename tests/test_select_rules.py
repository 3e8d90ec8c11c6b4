"""The noise-aware selection rules (sweep.select) against hand-computed tests: non-inferiority in a fixed sequence
of sparsities (choosing the control when the first fails), superiority after Holm, and the one-seed fallback."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecse.core.results import Point, TrialResult
from sparsecse.study.select import select
from sparsecse.study.stats import noninferior


def _r(s, seed, dev, lam=0.5):
    return TrialResult(Point(s, lam, seed), {"done": True, "best_stsb_dev": dev, "test/avg": 70.0}, None, "c")


CONTROL = {1: 80.0, 2: 81.0, 3: 80.5, 4: 80.2, 5: 80.8}


def _grid(offsets: dict[float, list[float]]) -> list[TrialResult]:
    """The control per seed, and at each sparsity the control's dev plus the given per-seed offsets."""
    rows = [_r(0.0, k, v) for k, v in CONTROL.items()]
    for s, offs in offsets.items():
        rows += [_r(s, k, CONTROL[k] + o) for k, o in zip(CONTROL, offs)]
    return rows


def test_noninferiority_one_sided_exact_test_by_hand():
    # d + margin = (0.2, 0.4, 0.1, 0.3, 0.6) all > 0: only the all-plus pattern reaches the observed mean: p = 1/32
    t = noninferior({k: CONTROL[k] + o for k, o in zip(CONTROL, (-0.3, -0.1, -0.4, -0.2, 0.1))}, CONTROL, 0.5)
    assert t["test"] == "exact one-sided sign-flip" and t["p"] == pytest.approx(1 / 32) and t["passed"]
    assert t["diff"] == pytest.approx(-0.18)
    # one shift below the margin: d + m = (0.2, 0.4, −0.1, 0.3, 0.6); patterns with mean >= 0.28: flipping only the
    # 0.1 gives the same mean as the observed... count: sums >= 1.4 of ±0.2 ±0.4 ±0.1 ±0.3 ±0.6 → 2 of 32
    t = noninferior({k: CONTROL[k] + o for k, o in zip(CONTROL, (-0.3, -0.1, -0.6, -0.2, 0.1))}, CONTROL, 0.5)
    assert t["p"] == pytest.approx(2 / 32) and not t["passed"]  # 0.0625 > 0.05
    one = noninferior({1: 79.6}, {1: 80.0}, 0.5)
    assert one["test"].startswith("one unit") and one["passed"] and one["p"] is None
    assert not noninferior({1: 79.4}, {1: 80.0}, 0.5)["passed"]


def test_noninferior_takes_the_sparsest_point_before_the_first_failure():
    rows = _grid({0.02: [0.1, 0.2, 0.0, 0.1, 0.3],      # clearly within the margin
                  0.1: [-0.3, -0.1, -0.4, -0.2, 0.1],   # within: p = 1/32
                  0.3: [-2.0, -1.5, -1.8, -2.2, -1.0],  # fails: the sequence stops here
                  0.5: [0.2, 0.3, 0.1, 0.2, 0.4]})      # would pass, but lies after a failure
    sel = select(rows, rule="noninferior", margin=0.5)
    assert sel.sparsity == 0.1 and not sel.control_won and sel.rule == "noninferior"
    steps = sel.rule_detail["steps"]
    assert [(s["sparsity"], s["passed"]) for s in steps] == [(0.02, True), (0.1, True), (0.3, False)]
    assert select(rows).sparsity == 0.5  # best_dev, by contrast, takes the best mean dev


def test_noninferior_chooses_the_control_when_the_first_sparsity_fails():
    rows = _grid({0.02: [-1.0, -0.9, -1.2, -0.8, -1.1], 0.1: [0.5, 0.5, 0.5, 0.5, 0.5]})
    sel = select(rows, rule="noninferior", margin=0.5)
    assert sel.control_won and sel.sparsity == 0.0
    assert "no pruned point was shown within 0.5" in sel.rule_detail["why"]


def test_superior_needs_a_win_that_survives_holm_else_the_control():
    small = _grid({0.1: [0.3, 0.2, 0.4, 0.1, 0.2], 0.3: [1.0, 0.9, 1.2, 0.8, 1.1]})
    sel = select(small, rule="superior")
    # 5 seeds: the two-sided exact test's floor is 2/32 = 0.0625 > 0.05, so no gain can be credited: the control
    assert sel.control_won and all(not s["passed"] for s in sel.rule_detail["steps"])
    assert sel.rule_detail["steps"][0]["p_raw"] == pytest.approx(0.0625)
    many = [_r(0.0, k, 80.0 + (k % 3) * 0.1) for k in range(12)]
    many += [_r(0.1, k, 80.0 + (k % 3) * 0.1 + 1.0 + (k % 2) * 0.1) for k in range(12)]  # +1.0..+1.1 each seed
    many += [_r(0.3, k, 80.0 + (k % 3) * 0.1 + (0.2 if k % 2 else -0.2)) for k in range(12)]  # +0.0 on average
    sel = select(many, rule="superior")
    assert sel.sparsity == 0.1 and [s["passed"] for s in sel.rule_detail["steps"]] == [True, False]
    assert sel.rule_detail["steps"][0]["family"] == 2  # both sparsities' tests, Holm-corrected together


def _dev(base, noise: float, seed: int, gold):
    rng = np.random.default_rng(seed)
    return {"dev": (base + rng.normal(0, noise, len(gold)), gold)}


def test_with_one_seed_the_rules_test_on_the_dev_pairs():
    """One seed, one replicate: no test over units exists, so each rule bootstraps the dev pairs of the two
    trials' best models (their kept predictions): a point as good as the control is non-inferior, one far worse
    is not, and the sequence stops there."""
    gold = np.random.default_rng(0).uniform(0, 5, 400)
    rows = [_r(0.0, 1, 80.0), _r(0.02, 1, 79.9), _r(0.1, 1, 70.0), _r(0.3, 1, 81.0)]
    ctrl = _dev(gold, 1.0, 1, gold)
    near = ctrl["dev"][0]  # a model that ranks the dev pairs almost as the control does
    preds = {"s0.000_l0.50_seed1": ctrl, "s0.020_l0.50_seed1": _dev(near, 0.05, 2, gold),
             "s0.100_l0.50_seed1": _dev(gold, 4.0, 3, gold), "s0.300_l0.50_seed1": _dev(near, 0.05, 4, gold)}
    sel = select(rows, rule="noninferior", margin=0.5, dev_predictions=preds)
    steps = sel.rule_detail["steps"]
    assert [(s["sparsity"], s["passed"]) for s in steps] == [(0.02, True), (0.1, False)]
    assert steps[0]["test"] == "one-sided bootstrap over dev pairs" and steps[0]["p"] < 0.05
    assert sel.sparsity == 0.02
    without = select(rows, rule="noninferior", margin=0.5)  # no predictions kept: the point estimate, said so
    assert without.rule_detail["steps"][0]["test"].startswith("one unit: point estimate")
    sup = select(rows, rule="superior", dev_predictions=preds)
    assert all(s["test"] == "bootstrap over dev pairs" for s in sup.rule_detail["steps"])
