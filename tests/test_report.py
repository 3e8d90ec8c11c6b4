"""Selection and the over-seeds table: dev-only choice, mean ± std per grid point, the s = 0 control per seed;
the report's sections, its HTML page and its figures (read back as plotted data)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sparsecse import SparseCSEError
from sparsecse.study.report import _pm, _table
from sparsecse.core.results import Point, TrialResult
from sparsecse.study.select import control, findings, select


def _row(s, lam, seed, dev, test_b, error=None, done=True, scorer="align_uniform", **reading):
    return TrialResult(Point(s, lam, seed, scorer, **reading),
                       {"done": done, "best_stsb_dev": dev, "test/STSBenchmark": test_b, "test/avg": test_b - 1},
                       error, f"tune/t{s}_{lam}_{seed}/checkpoint_000001")


def test_select_averages_dev_over_seeds_and_reports_test_mean_std():
    rows = [_row(0.0, 0.25, k, 80.0, 70.0 + k) for k in (1, 2, 3)]
    rows += [_row(0.0, 0.75, k, 80.0, 99.0) for k in (1, 2, 3)]  # a second s=0 entry per seed is not double-counted
    rows += [_row(0.1, 0.25, k, d, t) for k, d, t in ((1, 79.0, 71.0), (2, 83.0, 72.0), (3, 80.0, 76.0))]
    rows += [_row(0.3, 0.25, k, d, 90.0) for k, d in ((1, 81.5, ), (2, 81.5), (3, 81.4))]
    rows.append(_row(0.5, 0.25, 1, float("nan"), 99.0))  # non-finite: never chosen
    rows.append(_row(0.5, 0.75, 1, 99.0, 99.0, error="boom"))  # failed: never chosen
    sel = select(rows)
    # mean dev: s=0.1 → 80.667, s=0.3 → 81.467: the higher mean wins although s=0.1 has the single best seed
    assert (sel.sparsity, sel.lam) == (0.3, 0.25)
    assert sel.dev_mean == pytest.approx(np.mean([81.5, 81.5, 81.4]))
    assert sel.seeds == [1, 2, 3] and sel.test["STSBenchmark"] == pytest.approx(90.0)
    # the best-dev seed of the chosen point is exported, from its trial's checkpoint in the run's storage
    assert sel.checkpoint == "tune/t0.3_0.25_1/checkpoint_000001" and sel.trial == "s0.300_l0.25_seed1"
    ctrl = control(rows)
    assert ctrl["seeds"] == [1, 2, 3]
    # the λ=0.75 duplicate of the control (99.0) is dropped in favour of the first λ per seed
    assert ctrl["test"]["STSBenchmark"] == pytest.approx(72.0)
    # sample std over seeds (ddof = 1): 1.0 for 71, 72, 73 (the population std would be 0.82)
    assert ctrl["test_std"]["STSBenchmark"] == pytest.approx(np.std([71.0, 72.0, 73.0], ddof=1)) == pytest.approx(1.0)
    cells = _pm(ctrl["test"], ctrl["test_std"], ["STSBenchmark", "avg"])
    assert cells == {"STSBenchmark": "72.00 ± 1.00", "avg": "71.00 ± 1.00"}
    md = _table([("ctrl", cells)], ["STSBenchmark", "avg"])
    assert md.splitlines()[-1] == "| ctrl | 72.00 ± 1.00 | 71.00 ± 1.00 |"
    one = select([_row(0.1, 0.5, 1, 80.0, 70.0)])
    assert one.test_std["STSBenchmark"] is None  # one seed: no spread, shown as the mean alone
    assert _pm(one.test, one.test_std, ["STSBenchmark"]) == {"STSBenchmark": "70.00"}


def test_selection_can_say_pruning_did_not_help_and_never_picks_a_control_scorer():
    rows = [_row(0.0, 0.5, 1, 90.0, 80.0), _row(0.2, 0.5, 1, 70.0, 60.0), _row(0.2, 0.5, 1, 95.0, 85.0, scorer="random")]
    sel = select(rows)  # the control is best on dev (random is better still, but random is a control, not a method)
    assert sel.sparsity == 0.0 and sel.control_won and sel.candidates == 2
    assert select([_row(0.0, 0.5, 1, 70.0, 60.0), _row(0.2, 0.5, 1, 70.0, 60.0)]).control_won  # a tie: the control
    win = select([_row(0.0, 0.5, 1, 70.0, 60.0), _row(0.2, 0.5, 1, 71.0, 60.0)])
    assert win.sparsity == 0.2 and not win.control_won
    # select_lam: the paper's fixed λ = 0.5 even when another λ is better on dev
    rows = [_row(0.1, 0.25, 1, 85.0, 70.0), _row(0.1, 0.5, 1, 80.0, 70.0), _row(0.0, 0.25, 1, 60.0, 50.0)]
    assert (select(rows).lam, select(rows, select_lam=0.5).lam) == (0.25, 0.5)
    assert select([_row(0.2, 0.5, 1, 70.0, 60.0, done=False)]) is None
    assert control([_row(0.2, 0.5, 1, 70.0, 60.0)]) is None


def test_failed_trials_fail_the_sweep_unless_allowed():
    from sparsecse import TrialsFailed
    from sparsecse.core.config import load_config
    from sparsecse.run.outcome import check_failures

    summary = {"failed": [{"trial": "s0.100_l0.50_seed1", "error": "training loss became non-finite"}],
               "num_trials": 2, "selected": {"sparsity": 0.3}}
    with pytest.raises(TrialsFailed, match=r"1 of 2 trials failed .*s0.100_l0.50_seed1.*allow_failed_trials"):
        check_failures(summary, load_config(None))
    check_failures(summary, load_config(None, ["sweep.allow_failed_trials=true"]))  # tolerated: no error
    with pytest.raises(TrialsFailed, match="no trial finished"):
        check_failures({"failed": [], "num_trials": 2, "selected": None}, load_config(None))


def test_controls_section_compares_each_method_at_equal_budget():
    from sparsecse.core.config import load_config
    from sparsecse.study.report import ReportInputs, render_markdown
    from sparsecse.study.select import comparisons, results_table

    rows = [_row(0.0, 0.25, k, 80.0, 70.0 + k) for k in (1, 2, 3)]
    rows += [_row(0.3, lam, k, 80.0 + lam + k / 10, 72.0 + k) for lam in (0.25, 0.75) for k in (1, 2, 3)]
    rows += [_row(0.3, 0.25, k, 79.0, 60.0 + k, scorer="random") for k in (1, 2, 3)]
    rows += [_row(0.3, 0.25, k, 79.0, 71.0 + k, scorer="magnitude") for k in (1, 2, 3)]
    comps = comparisons(rows)
    assert [(c.method, c.lam) for c in comps] == [("align_uniform", 0.75), ("random", None), ("magnitude", None)]
    ours, rand, mag = comps
    assert ours.vs_control["diff"] == pytest.approx(2.0) and ours.vs_control["std"] == pytest.approx(0.0)
    assert ours.vs_random["diff"] == pytest.approx(12.0)
    # 3 seeds: the exact sign-flip test cannot go below 0.25, so even +12 every seed is not a claim; the table's
    # 5 tests are one family and Holm leaves 0.25 × 5 capped at 1
    assert ours.vs_random["p_raw"] == 0.25 and ours.vs_random["family"] == 5
    assert ours.vs_random["p"] == 1.0 and ours.vs_random["verdict"] == "within noise"
    assert rand.vs_random is None and rand.vs_control["verdict"] == "within noise"
    assert mag.vs_control["diff"] == pytest.approx(1.0) and mag.vs_random["diff"] == pytest.approx(11.0)
    cfg = load_config(None, ["sweep.sparsities=[0, 0.3]", "sweep.lams=[0.25, 0.75]", "sweep.seeds=[1, 2, 3]",
                             "sweep.scorers=[align_uniform, random, magnitude]", "eval.tasks=[STSBenchmark]",
                             "score.source=stsb"])
    for r in rows:
        r.metrics["test/avg"] = r.metrics["test/STSBenchmark"]
    sel = select(rows)
    md = render_markdown(ReportInputs("t", cfg, rows, results_table(rows, ["STSBenchmark", "avg"]), sel,
                                      control(rows), {"STSBenchmark": 70.0, "avg": 70.0, "align": 0.1, "uniform": -2.0},
                                      scoring={"positive_pairs": 10, "sts_test_overlap": 7},
                                      findings=findings(rows, sel, ["STSBenchmark", "avg"])))
    assert "10 positive pairs (gold > 4)" in md and "**7 of the unique positive pairs are verbatim STS12–16 test" in md
    assert "## Controls at equal budget" in md and "| 30% | random |" in md
    assert "Selection chose among 3 grid points, the s = 0 control included." in md
    assert "score.combine = gradient, score.normalize = none" in md


def test_mask_allocation_per_layer_table_and_heat_map():
    from sparsecse.study import figures
    from sparsecse.study.report import allocation_table
    from sparsecse.study.select import allocation

    hm = np.ones((3, 4))
    hm[2, :3] = 0
    nm = np.ones((3, 10))
    nm[0, :5] = 0
    a = allocation(hm, nm)
    assert a == {"heads": [0.0, 0.0, 0.75], "neurons": [0.5, 0.0, 0.0]}
    assert allocation_table(a).splitlines()[2] == "| heads pruned | 0% | 0% | 75% |"
    fig = figures.allocation(a, "t")
    # the heat map shows exactly the fractions: heads in row 0, neurons in row 1, one column per layer
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), [[0.0, 0.0, 0.75], [0.5, 0.0, 0.0]])
    assert [t.get_text() for t in fig.axes[0].texts] == ["0%", "0%", "75%", "50%", "0%", "0%"]
    assert figures.png(fig)[:4] == b"\x89PNG"


def test_scoring_on_the_test_split_warns_in_one_line(capsys):
    from sparsecse.core.config import load_config
    from sparsecse.run.checks import check_config

    check_config(load_config(None, ["score.source=stsb", "score.split=test"]))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "warning: score.split=test" in err and "not clean" in err
    check_config(load_config(None))
    assert capsys.readouterr().err == ""


def test_stability_and_the_alignment_uniformity_figure():
    from sparsecse.study import figures
    from sparsecse.study.select import stability

    rows = [_row(0.0, 0.5, 1, 80.0, 70.0), _row(0.1, 0.5, 1, 82.0, 69.0), _row(0.3, 0.5, 1, 81.0, 75.0),
            _row(0.3, 0.5, 1, 99.0, 99.0, scorer="random")]  # a control scorer is never a task's "best sparsity"
    for r, (a, u) in zip(rows, ((0.2, -2.0), (0.25, -2.1), (0.3, -2.2), (0.1, -1.0))):
        r.metrics.update(align=a, uniform=u)
    sel = select(rows)
    assert sel.sparsity == 0.1
    (st,) = stability(rows, sel, ["STSBenchmark"])
    assert (st.best_sparsity, st.best, st.selected) == (0.3, 75.0, 69.0)
    assert st.sparsity_gap == pytest.approx(0.2)
    figs = figures.sweep_figures(rows, ["STSBenchmark", "avg"], {"align": 0.2, "uniform": -2.3},
                                 {"align": 0.3, "uniform": -1.5})
    assert list(figs) == ["sts_avg_vs_sparsity.png", "sts_tasks_vs_sparsity.png", "align_uniform.png"]
    ax = figs["align_uniform.png"].axes[0]
    # one scatter per scorer, then the stage-1 and backbone stars: (uniformity, alignment) of each
    pts = [c.get_offsets().tolist() for c in ax.collections]
    assert pts == [[[-2.0, 0.2], [-2.1, 0.25], [-2.2, 0.3]], [[-1.0, 0.1]], [[-2.3, 0.2]], [[-1.5, 0.3]]]
    np.testing.assert_allclose(ax.collections[0].get_array(), [69.0, 68.0, 74.0])  # coloured by the test avg


def test_the_sts_figure_plots_each_method_as_mean_and_std_over_seeds_from_the_control():
    from sparsecse.study import figures

    rows = [_row(0.0, 0.5, k, 80.0, 70.0 + k) for k in (1, 2, 3)]
    rows += [_row(s, 0.5, k, 80.0, 60.0 + 10 * s + 2 * k) for s in (0.1, 0.3) for k in (1, 2, 3)]
    rows += [_row(0.3, 0.5, k, 80.0, 50.0 + k, scorer="random") for k in (1, 2, 3)]
    rows.append(_row(0.1, 0.5, 4, 80.0, 0.0, error="boom"))  # failed: not plotted
    ax = figures.sweep_figures(rows, ["STSBenchmark", "avg"])["sts_avg_vs_sparsity.png"].axes[0]
    curves = {c.get_label(): c for c in ax.containers}  # one errorbar container per method
    ours, rand = curves["λ=0.5"].lines[0], curves["random (control)"].lines[0]
    # x in %, y the mean over seeds of test avg (= STS-B − 1), each curve starting at the s = 0 control (71)
    assert ours.get_xdata().tolist() == [0.0, 10.0, 30.0] and rand.get_xdata().tolist() == [0.0, 30.0]
    np.testing.assert_allclose(np.asarray(ours.get_ydata(), float), [71.0, 64.0, 66.0])
    np.testing.assert_allclose(np.asarray(rand.get_ydata(), float), [71.0, 51.0])
    ctrl = [ln for ln in ax.get_lines() if ln.get_label() == "rewound SimCSE (s=0)"][0]
    assert list(ctrl.get_ydata()) == [71.0, 71.0]  # the control's dashed line
    # the error bars are ± one sample std over seeds (1 for the control's 71..73 and 2 for seeds 1..3 at step 2)
    seg = curves["λ=0.5"].lines[2][0].get_segments()
    np.testing.assert_allclose([s[1][1] - s[0][1] for s in seg], [2.0, 4.0, 4.0])  # 2 × std


def test_each_reading_of_the_scores_is_its_own_grid_point_and_method():
    """score.normalize=[none, layer]: selection chooses among (sparsity, λ, reading) points; the controls table
    has a row per reading, each compared with random under the same reading."""
    from sparsecse.study.select import comparisons, results_table

    rows = [_row(0.0, 0.5, k, 80.0, 70.0) for k in (1, 2)]
    rows += [_row(0.3, 0.5, k, 79.0, 69.0 + k) for k in (1, 2)]
    rows += [_row(0.3, 0.5, k, 81.0, 72.0 + k, normalize="layer") for k in (1, 2)]
    rows += [_row(0.3, 0.5, k, 70.0, 60.0, scorer="random", normalize=n) for k in (1, 2) for n in ("none", "layer")]
    rows[-1].metrics["test/avg"] = 50.0  # random under layer is worse than random under none at seed 2
    sel = select(rows)
    assert (sel.sparsity, sel.normalize, sel.method, sel.candidates) == (
        0.3, "layer", "align_uniform (normalize=layer)", 3)
    comps = {c.method: c for c in comparisons(rows)}
    assert list(comps) == ["align_uniform", "align_uniform (normalize=layer)", "random", "random (normalize=layer)"]
    # paired against the random of its own reading: test avg 71 + k against 59, then 50 at seed 2
    assert comps["align_uniform (normalize=layer)"].vs_random["diff"] == pytest.approx(np.mean([72 - 59, 73 - 50]))
    assert comps["align_uniform"].vs_random["diff"] == pytest.approx(np.mean([69 - 59, 70 - 59]))
    flat = results_table(rows, ["STSBenchmark", "avg"])
    assert [x["trial"] for x in flat if x["sparsity"] == 0.3 and x["seed"] == 1] == [
        "s0.300_l0.50_seed1", "s0.300_l0.50_norm-layer_seed1", "s0.300_random_seed1", "s0.300_random_norm-layer_seed1"]


def test_a_single_seed_comparison_gets_a_bootstrap_over_test_pairs():
    from sparsecse.study.report import render_comparisons
    from sparsecse.study.select import comparisons

    rng = np.random.default_rng(0)
    gold = np.round(rng.uniform(0, 5, 600), 1)
    preds = {"s0.000_l0.50_seed1": {"STSBenchmark": (gold + rng.normal(0, 2.0, 600), gold)},
             "s0.300_l0.50_seed1": {"STSBenchmark": (gold + rng.normal(0, 1.0, 600), gold)},  # much closer to gold
             "s0.300_random_seed1": {"STSBenchmark": (gold + rng.normal(0, 2.0, 600), gold)}}
    rows = [_row(0.0, 0.5, 1, 80.0, 0.0), _row(0.3, 0.5, 1, 80.0, 0.0), _row(0.3, 0.5, 1, 80.0, 0.0, scorer="random")]
    from sparsecse.method.evaluate import sts_from_predictions

    for r, name in zip(rows, preds):
        r.metrics["test/avg"] = sts_from_predictions(preds[name])["avg"]
    ours, rand = comparisons(rows, predictions=preds)
    assert ours.vs_control["verdict"] == "better" and ours.vs_control["bootstrap"]["lo"] > 0
    assert ours.vs_control["diff"] == pytest.approx(ours.mean - rows[0].metrics["test/avg"])
    assert rand.vs_control["verdict"] == "within noise"  # the same noise level: the interval covers 0
    assert rand.vs_control["bootstrap"]["lo"] < 0 < rand.vs_control["bootstrap"]["hi"]
    md = "\n".join(render_comparisons([ours, rand], control(rows)))
    assert "one seed; bootstrap over test pairs, 1000 resamples" in md and ": better)" in md
    # without predictions, one seed makes no claim
    assert comparisons(rows)[0].vs_control["verdict"].startswith("one seed")


def test_sampled_points_are_drawn_as_a_scatter_with_a_fit():
    """sweep.search=optuna gives one trial per (continuous) sparsity: the figure is a scatter coloured by λ and a
    quadratic fit in log sparsity, not one line per λ."""
    from sparsecse.study import figures

    pts = ((0.013, 0.31), (0.05, 0.62), (0.12, 0.45), (0.3, 0.7))
    rows = [_row(0.0, 0.5, 1, 80.0, 70.0)] + [_row(s, lam, 1, 80.0, 70.0 + 10 * s - 20 * s * s) for s, lam in pts]
    figs = figures.sweep_figures(rows, ["STSBenchmark", "avg"], sampled=True)
    assert set(figs) == {"sts_avg_vs_sparsity.png", "sts_tasks_vs_sparsity.png"}
    for ax in (figs["sts_avg_vs_sparsity.png"].axes[0], figs["sts_tasks_vs_sparsity.png"].axes[0]):
        assert ax.get_xscale() == "log"
        (sc,) = ax.collections
        assert sc.get_offsets()[:, 0].tolist() == pytest.approx([100 * s for s, _ in pts])
        np.testing.assert_allclose(sc.get_array(), [lam for _, lam in pts])  # coloured by λ
        fit = [ln for ln in ax.get_lines() if ln.get_label() == "quadratic fit (log s)"][0]
        # the least-squares quadratic in log s through the plotted points, drawn over their sparsity range
        x, y = np.array([s for s, _ in pts]), sc.get_offsets()[:, 1]
        xs = np.asarray(fit.get_xdata(), float) / 100
        assert (xs.min(), xs.max()) == pytest.approx((0.013, 0.3))
        np.testing.assert_allclose(fit.get_ydata(), np.polyval(np.polyfit(np.log(x), y, 2), np.log(xs)))
        assert not [ln for ln in ax.get_lines() if ln.get_label().startswith("λ=")]  # no per-λ curves


def _sized(row: TrialResult, params: int) -> TrialResult:
    row.metrics["encoder_params"] = params
    return row


def test_pareto_objective_takes_the_smallest_model_within_delta_and_reports_the_front():
    """sweep.objective=pareto: the front of (dev ↑, encoder parameters ↓) over the candidate points (seeds pooled),
    and selection picks the smallest model whose mean dev is within δ of the best dev — never test, never a
    control scorer; the report gets the front table and a figure."""
    from sparsecse.core.config import load_config
    from sparsecse.study import figures
    from sparsecse.study.report import ReportInputs, pareto_table, render_markdown
    from sparsecse.study.select import candidate_points, pareto_front, results_table

    size = {0.0: 1000, 0.1: 900, 0.3: 700, 0.5: 500}
    dev = {0.0: 80.0, 0.1: 80.6, 0.3: 80.2, 0.5: 78.0}
    rows = [_sized(_row(s, 0.5, k, dev[s] + (k - 2) / 10, 70.0 + 10 * s), size[s]) for s in size for k in (1, 2, 3)]
    rows.append(_sized(_row(0.5, 0.5, 1, 99.0, 99.0, scorer="random"), 500))  # a control scorer: never chosen
    assert select(rows).sparsity == 0.1  # objective dev: the best dev
    sel = select(rows, objective="pareto", delta=0.5)
    # best dev 80.6 (s = 10 %); within 0.5: s = 10 % and 30 % (80.2); the smaller of them is 30 %
    assert (sel.sparsity, sel.params, sel.control_won) == (0.3, 700, False)
    assert sel.pareto["best_dev"] == pytest.approx(80.6)
    # s = 0 (1000 params, dev 80.0) is dominated by s = 10 % (fewer params, higher dev); the rest form the front
    assert [f["sparsity"] for f in sel.pareto["front"]] == [0.5, 0.3, 0.1]
    assert [f["params"] for f in sel.pareto["front"]] == [500, 700, 900] and sel.pareto["front"][0]["seeds"] == 3
    assert select(rows, objective="pareto", delta=3.0).sparsity == 0.5  # a wider δ admits the smallest model
    assert select(rows, objective="pareto", delta=0.0).sparsity == 0.1  # δ = 0: the best dev itself
    # only the control within δ: pruning did not help
    alone = [_sized(_row(0.0, 0.5, 1, 81.0, 70.0), 1000), _sized(_row(0.3, 0.5, 1, 79.0, 70.0), 700)]
    assert select(alone, objective="pareto", delta=0.5).control_won
    # equal size, the higher dev; ties in the front are dropped as dominated
    assert pareto_front([{"dev": 1.0, "params": 5}, {"dev": 2.0, "params": 5}, {"dev": 0.5, "params": 3}]) == [
        {"dev": 0.5, "params": 3}, {"dev": 2.0, "params": 5}]
    for r in rows:
        del r.metrics["encoder_params"]
    with pytest.raises(SparseCSEError, match="encoder_params"):  # trials of a sweep from before it was reported
        select(rows, objective="pareto")
    for r, s in zip(rows, [s for s in size for _ in (1, 2, 3)] + [0.5]):
        r.metrics["encoder_params"] = size[s]
    table = pareto_table(sel.pareto["front"])
    assert table.count("\n") == 4  # header, rule, 3 front rows
    assert "| 30.00% | align_uniform | 0.5 | 700 |" in table and table.count("**selected**") == 1
    ax = figures.pareto(candidate_points(rows), sel).axes[0]
    grid, ctrl, chosen = ax.collections[0], ax.collections[1], ax.collections[-1]
    # every candidate point (mean dev over seeds) at its size in millions; the control apart; the chosen point
    np.testing.assert_allclose(sorted(map(tuple, grid.get_offsets())), [(5e-4, 78.0), (7e-4, 80.2), (9e-4, 80.6)])
    np.testing.assert_allclose(ctrl.get_offsets(), [[1e-3, 80.0]])
    np.testing.assert_allclose(chosen.get_offsets(), [[7e-4, 80.2]])
    front = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"][0]
    assert front.get_xdata().tolist() == pytest.approx([5e-4, 7e-4, 9e-4])
    cfg = load_config(None, ["sweep.select_on=stsb-dev", "sweep.sparsities=[0, 0.1, 0.3, 0.5]", "sweep.lams=[0.5]", "sweep.seeds=[1, 2, 3]",
                             "sweep.objective=pareto", "eval.tasks=[STSBenchmark]"])
    md = render_markdown(ReportInputs("t", cfg, rows, results_table(rows, ["STSBenchmark", "avg"]), sel, control(rows),
                                      {"STSBenchmark": 70.0, "avg": 70.0, "align": 0.1, "uniform": -2.0},
                                      findings=findings(rows, sel, ["STSBenchmark", "avg"])))
    assert "## Pareto front: STS-B dev vs encoder parameters" in md and table in md
    assert "by the smallest encoder within δ = 0.5 of the best STS-B dev (80.60" in md and "700 encoder parameters" in md


def _html_tables(page: str) -> tuple[list[list[list[str]]], list[str]]:
    """(every <table> as rows of cell texts, the tags in document order) of an HTML page."""
    from html.parser import HTMLParser

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.tags, self.cell = [], [], None

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag if tag != "img" else "img:" + dict(attrs)["alt"])
            if tag == "table":
                self.tables.append([])
            elif tag == "tr":
                self.tables[-1].append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.tables[-1][-1].append(self.cell.strip())
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    p = Tables()
    p.feed(page)
    return p.tables, p.tags


def test_report_html_is_a_page_with_real_tables_the_answer_first_and_each_figure_beside_its_section():
    from sparsecse.study import figures
    from sparsecse.core.config import load_config
    from sparsecse.study.report import ReportInputs, render_html, render_markdown
    from sparsecse.study.select import comparisons, results_table

    rows = [_sized(_row(0.0, 0.5, k, 80.0, 70.0 + k), 1_000_000) for k in (1, 2, 3)]
    rows += [_sized(_row(0.3, 0.5, k, 82.0, 71.0 + k + k / 10), 700_000) for k in (1, 2, 3)]
    for r in rows:
        r.metrics.update(align=0.2 + r.point.sparsity, uniform=-2.0)
    cfg = load_config(None, ["sweep.sparsities=[0, 0.3]", "sweep.lams=[0.5]", "sweep.seeds=[1, 2, 3]",
                             "eval.tasks=[STSBenchmark]"])
    flat = results_table(rows, ["STSBenchmark", "avg"])
    sel = select(rows)
    figs = {k: figures.png(v) for k, v in figures.sweep_figures(rows, ["STSBenchmark", "avg"]).items()}
    inp = ReportInputs("run1", cfg, rows, flat, sel, control(rows),
                       {"STSBenchmark": 70.0, "avg": 69.0, "align": 0.1, "uniform": -2.0}, figures=figs,
                       findings=findings(rows, sel, ["STSBenchmark", "avg"]))
    page = render_html(inp)
    assert page.startswith("<!doctype html>") and "<pre" not in page and "| ---" not in page
    tables, tags = _html_tables(page)
    # the answer opens the page, before any table: the choice, its size against the dense model, its test
    # average and its paired difference to the control with the 95 % t interval over the 3 seeds
    answer = page[page.index('<div class="answer">'):page.index("</div>")]
    assert tags.index("div") < tags.index("table") and tags.index("h1") < tags.index("div")
    assert "SparseCSE at s=30%, λ=0.5" in answer and "0.70 M encoder parameters against 1.00 M dense (-30.0%)" in answer
    comp = comparisons(rows)[0].vs_control  # diffs 1.1, 1.2, 1.3: mean 1.2, std 0.1, t(2) = 4.303
    assert comp["lo"] == pytest.approx(1.2 - 4.303 * 0.1 / 3 ** 0.5, abs=1e-3)
    assert (f"+1.20 [95 % CI {comp['lo']:+.2f}, {comp['hi']:+.2f}; t over 3 seeds; exact sign-flip p = 0.250, Holm "
            f"p = 0.250 in a family of 1], within noise") in answer  # 3 seeds cannot reach p < 0.25
    assert f"STS test average {sel.test['avg']:.2f}" in answer
    # the trials table holds the results' values, row for row (report.md's "All trials" as a real table)
    trials = next(t for t in tables if t[0][:2] == ["sparsity", "scorer"])
    assert [(r[3], r[5], r[6]) for r in trials[1:]] == [
        (str(x["seed"]), f"{x['best_stsb_dev']:.2f}", f"{x['test/avg']:.2f}") for x in flat]
    test = next(t for t in tables if t[0][0] == "Model")
    assert test[-2][0].startswith("SparseCSE, dev-selected") and test[-2][1] == f"{sel.test['STSBenchmark']:.2f}"
    # each figure right after its own section's table, and every figure once
    imgs = [t for t in tags if t.startswith("img:")]
    assert sorted(imgs) == sorted(f"img:{n}" for n in figs)
    at = lambda text: page.index(text)  # noqa: E731
    assert at("<h2>Controls at equal budget") < at('alt="sts_avg_vs_sparsity.png"') < at("<h2>Stability")
    assert at("<h2>Alignment / uniformity") < at('alt="align_uniform.png"') < at("<h2>All trials")
    # the same inputs give report.md, untouched by the page
    assert "## Controls at equal budget" in render_markdown(inp) and "<table" not in render_markdown(inp)
    assert "Speed against" not in answer  # nothing measured, nothing said
    # with the export's measured speed (export.speed_rows), the answer ends with each pruned path against the dense
    # model under sentence-transformers
    from dataclasses import replace

    from sparsecse.study.report import answer as answer_of

    speed = [{"path": "sentence-transformers, dense", "sentences_per_s": 160.0, "x_dense": 1.0},
             {"path": "sentence-transformers, pruned/", "sentences_per_s": 220.8, "x_dense": 1.38},
             {"path": "ONNX Runtime, pruned/onnx/model_qint8.onnx", "sentences_per_s": 598.4, "x_dense": 3.74}]
    text = answer_of(replace(inp, export_speed=speed))
    assert text.endswith("Speed against the dense model under sentence-transformers, on the exporting machine's "
                         "CPU: the pruned model under sentence-transformers 1.38×, pruned/onnx/model_qint8.onnx under "
                         "ONNX Runtime 3.74×.")
    # the control chosen: export/pruned is the same model, faster only by its forward — said so
    kept = replace(inp, export_speed=speed, selected=replace(inp.selected, control_won=True))
    assert ("its copy in export/pruned (nothing removed; its padding-free forward) under sentence-transformers 1.38×"
            in answer_of(kept))


@pytest.mark.slow
@pytest.mark.skipif(not (__import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")),
                    reason="needs Debian's chromium (apt-get install chromium) to render the page")
def test_report_html_has_no_horizontal_overflow_in_a_browser(tmp_path):
    """Headless Chromium lays the page out at a laptop's and a phone's width: the page itself never scrolls
    sideways (wide tables scroll inside their own box, figures shrink to fit)."""
    import re
    import shutil
    import subprocess

    from sparsecse.study import figures
    from sparsecse.core.config import load_config
    from sparsecse.study.report import ReportInputs, render_html
    from sparsecse.study.select import results_table

    # a wide report: three scorers × two readings, long method names, every figure
    rows = [_row(0.0, 0.5, k, 80.0, 70.0 + k) for k in (1, 2, 3)]
    rows += [_row(s, lam, k, 80.0 + s + lam, 71.0 + k, scorer=sc, normalize=n, combine="score" if sc == "align_uniform" else "gradient")
             for s in (0.01, 0.1, 0.3) for lam in (0.25, 0.75) for k in (1, 2, 3)
             for sc in ("align_uniform", "random", "magnitude") for n in ("none", "layer")]
    for r in rows:
        r.metrics.update(align=0.2, uniform=-2.0)
    cfg = load_config(None, ["sweep.sparsities=[0, 0.01, 0.1, 0.3]", "sweep.lams=[0.25, 0.75]", "sweep.seeds=[1, 2, 3]",
                             "sweep.scorers=[align_uniform, random, magnitude]", "score.normalize=[none, layer]",
                             "score.combine=[score]", "eval.tasks=[STSBenchmark]"])
    flat = results_table(rows, ["STSBenchmark", "avg"])
    figs = {k: figures.png(v) for k, v in figures.sweep_figures(rows, ["STSBenchmark", "avg"]).items()}
    sel = select(rows)
    page = render_html(ReportInputs("a-rather-long-run-name-" * 3, cfg, rows, flat, sel, control(rows),
                                    {"STSBenchmark": 70.0, "avg": 69.0, "align": 0.1, "uniform": -2.0}, figures=figs,
                                    findings=findings(rows, sel, ["STSBenchmark", "avg"])))
    probe = tmp_path / "report.html"  # the page plus a line that writes what the browser measured into the title
    probe.write_text(page.replace("</body>", "<script>document.title = 'W' + document.documentElement.scrollWidth"
                                              " + '/' + window.innerWidth;</script></body>"))
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    for width in (1280, 600):
        dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                              "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
        scroll, inner = map(int, re.search(r"<title>W(\d+)/(\d+)</title>", dom).groups())
        assert scroll <= inner, f"the page is {scroll} px wide in a {inner} px window"


@pytest.mark.parametrize("name", ["grid", "pareto", "single", "sampled"])
def test_report_md_is_byte_for_byte_what_it_was_before_the_report_was_split(name):
    """report.md from the typed results, select.py and report.py equals tests/golden/ (first rendered by sparsecse
    12b9598 from dict rows; re-rendered, with SPARSECSE_UPDATE_GOLDEN=1, only where the report's content changed on
    purpose — the Holm-corrected, exact-test controls section — and the diff read before committing)."""
    from pathlib import Path

    import report_scenarios as S

    from sparsecse.study import figures
    from sparsecse.core.config import load_config
    from sparsecse.study.report import ReportInputs, render_markdown
    from sparsecse.study.select import allocation, candidate_points, results_table

    preds = pilot = alloc = transfer = None
    if name == "single":
        rows, preds = S.single()
    else:
        rows = getattr(S, name)()
    if name == "grid":
        pilot = S.PILOT
        alloc = allocation(np.array([[1, 0, 1, 1], [0, 0, 1, 1]]), np.array([[1] * 8, [0] * 4 + [1] * 4]))
        transfer = {"SimCSE": {"MR": 70.0, "CR": 75.0, "avg": 72.5}, "SparseCSE": {"MR": 71.0, "CR": 74.0, "avg": 72.5}}
    cfg = load_config(None, getattr(S, f"{name.upper()}_OVR"))
    res = [TrialResult.from_record(r) for r in rows]
    tasks = ["STS12", "STSBenchmark", "SICKRelatedness", "avg"]
    sel = select(res, cfg.sweep.select_lam, cfg.sweep.objective, cfg.sweep.pareto_delta)
    names = list(figures.sweep_figures(res, tasks, sampled=cfg.sweep.search == "optuna"))
    names += (["mask_allocation.png"] if alloc else []) + (["pareto.png"] if sel.pareto else [])
    names += ["pilot.png"] if pilot else []
    if sel.pareto:
        assert candidate_points(res, cfg.sweep.select_lam)
    md = render_markdown(ReportInputs("t", cfg, res, results_table(res, tasks), sel, control(res), S.BASELINE,
                                      transfer, dict.fromkeys(names, b""), alloc, S.SCORING, pilot, S.BACKBONE,
                                      findings=findings(res, sel, tasks, cfg.sweep.select_lam, predictions=preds,
                                                        overlap=S.SCORING.get("overlap"))))
    golden = Path(__file__).parent / "golden" / f"report-{name}.md"
    if os.environ.get("SPARSECSE_UPDATE_GOLDEN") == "1":
        golden.write_text(md)
    assert md == golden.read_text()
