"""sweep.replicates: independent stage-1 runs, each with its own trials; comparisons paired within a replicate and
tested over replicates. The grid, names and seeds here; a tiny Ray sweep with two replicates in tests/test_ray.py."""

from __future__ import annotations

import pytest

from sparsecse.core.config import load_config
from sparsecse.core.results import Point, TrialResult, grid_points, replicate_name
from sparsecse.study.select import comparisons, control, select


def test_the_grid_repeats_per_replicate_with_names_and_seeds_of_their_own():
    cfg = load_config(None, ["sweep.sparsities=[0, 0.1]", "sweep.lams=[0.5]", "sweep.seeds=[1, 2]",
                             "sweep.replicates=3", "sweep.scorers=[align_uniform, random]", "sweep.control_seeds=0"])
    pts = grid_points(cfg)
    assert len(pts) == 3 * 2 * 3 and {p.replicate for p in pts} == {0, 1, 2}
    assert len({p.name for p in pts}) == len(pts)  # every trial named apart
    first = Point(0.1, 0.5, 1)
    assert first.name == "s0.100_l0.50_seed1" and first.run_seed == 1  # replicate 0: as before replicates
    third = Point(0.1, 0.5, 1, replicate=2)
    assert third.name == "s0.100_l0.50_seed1_rep2" and third.run_seed == 2001 and third.key == first.key
    assert Point.from_params({"sparsity": 0.1, "lam": 0.5, "seed": 1}).replicate == 0  # records before replicates
    assert Point.from_params(third.params()) == third
    assert [replicate_name(x, 0) for x in ("simcse", "scores.parquet")] == ["simcse", "scores.parquet"]
    assert [replicate_name(x, 2) for x in ("simcse", "stage1", "scores.parquet")] == [
        "simcse-rep2", "stage1-rep2", "scores-rep2.parquet"]


def test_stage_one_of_a_replicate_has_its_own_seed():
    from sparsecse.run.rundir import replicate_config

    cfg = load_config(None, ["train.seed=7"])
    assert replicate_config(cfg, 0) is cfg and replicate_config(cfg, 3).train.seed == 10
    assert replicate_config(cfg, 3).to_dict()["model"] == cfg.to_dict()["model"]


def _t(s, seed, rep, value, scorer="align_uniform"):
    return TrialResult(Point(s, 0.5, seed, scorer, replicate=rep),
                       {"done": True, "best_stsb_dev": value, "test/avg": value}, None, "c")


def test_comparisons_average_seeds_within_a_replicate_and_test_over_replicates():
    rows = []
    for rep, (c1, c2, p1, p2) in enumerate([(70, 72, 72, 72), (71, 71, 72, 73), (70, 70, 71, 70)]):
        rows += [_t(0.0, 1, rep, c1), _t(0.0, 2, rep, c2), _t(0.1, 1, rep, p1), _t(0.1, 2, rep, p2)]
    (comp,) = comparisons(rows)
    # per replicate: control means 71, 71, 70; pruned 72, 72.5, 70.5 → differences 1.0, 1.5, 0.5 over 3 units
    assert comp.unit == "replicate" and comp.seeds == [0, 1, 2]
    vs = comp.vs_control
    assert vs["n"] == 3 and vs["diff"] == pytest.approx(1.0) and vs["std"] == pytest.approx(0.5)
    assert vs["p_raw"] == 0.25  # three replicates: the exact test's floor
    assert len(control(rows)["seeds"]) == 6  # one control per (replicate, seed), none collapsed
    sel = select(rows, rule="noninferior", margin=0.5)
    assert sel.rule_detail["steps"][0]["n"] == 3  # the rule's units are the replicates too
