"""The paper's two open readings of the score (combine, normalize) and the controls a gain must beat (random,
magnitude): each computed as stated, selectable from the config, and the same masks by every entry point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecse.method.prune import masks_for, select_masks
from sparsecse.method.score import Scores, importance, magnitude_importance, per_layer_l2, random_importance


def _grads(seed=0, nb=5, L=3, U=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(nb, L, U)), rng.normal(size=(nb, L, U)) * 10  # uniformity's gradients 10× larger


def test_combine_and_normalize_are_the_two_readings():
    ga, gu = _grads()
    lam = 0.3
    grad = np.abs(lam * ga + (1 - lam) * gu).mean(0)
    assert np.allclose(importance(ga, gu, lam), grad)
    assert np.allclose(importance(ga, gu, lam, "score"), lam * np.abs(ga).mean(0) + (1 - lam) * np.abs(gu).mean(0))
    # layer normalisation: every layer's score vector has unit L2 norm, so no layer dominates by scale
    lay = importance(ga, gu, lam, "gradient", "layer")
    assert np.allclose(np.linalg.norm(lay, axis=1), 1.0) and np.allclose(lay * np.linalg.norm(grad, axis=1)[:, None], grad)
    # "score" + "layer" (StarK): each objective normalised per layer before mixing, so the 10× larger
    # uniformity gradients no longer drown alignment
    a, u = per_layer_l2(np.abs(ga).mean(0)), per_layer_l2(np.abs(gu).mean(0))
    assert np.allclose(importance(ga, gu, lam, "score", "layer"), lam * a + (1 - lam) * u)
    assert np.array_equal(per_layer_l2(np.zeros((2, 3))), np.zeros((2, 3)))  # an all-zero layer stays zero


def test_layer_normalisation_removes_a_layers_scale():
    """A layer whose gradients are all 5× another's: ranked raw it is never pruned before the other; normalised
    per layer the two score the same, so each is pruned on its own merits."""
    rng = np.random.default_rng(1)
    g = rng.random((4, 3, 10))
    g[:, 2] = 5 * g[:, 1]
    sc = Scores(g, g, g, g, meta={})
    raw_h, _ = sc.importance(0.5)
    lay_h, _ = sc.importance(0.5, normalize="layer")
    assert np.allclose(raw_h[2], 5 * raw_h[1]) and np.allclose(lay_h[2], lay_h[1])
    assert int((select_masks(raw_h, raw_h, 0.3)[0][2] == 0).sum()) == 0  # raw: the loud layer keeps every unit


def test_random_control_is_seeded_and_prunes_the_same_count():
    h1, n1 = random_importance(2, 4, 37, seed=1)
    h1b, _ = random_importance(2, 4, 37, seed=1)
    h2, _ = random_importance(2, 4, 37, seed=2)
    assert np.array_equal(h1, h1b) and not np.array_equal(h1, h2) and n1.shape == (2, 37)


def test_magnitude_control_is_the_weight_norm_of_each_unit(tiny):
    head, neuron = magnitude_importance(tiny)
    layer = tiny.layers[1]
    d = 32 // 4
    sl = slice(2 * d, 3 * d)
    sa = layer.attention.self
    sq = sum(getattr(sa, n).weight[sl].pow(2).sum() + getattr(sa, n).bias[sl].pow(2).sum() for n in ("query", "key", "value"))
    sq = sq + layer.attention.output.dense.weight[:, sl].pow(2).sum()
    assert head[1, 2] == pytest.approx(float(sq.detach().sqrt()), rel=1e-5)
    j = 7
    nsq = (layer.intermediate.dense.weight[j].pow(2).sum() + layer.intermediate.dense.bias[j] ** 2
           + layer.output.dense.weight[:, j].pow(2).sum())
    assert neuron[1, j] == pytest.approx(float(nsq.detach().sqrt()), rel=1e-5)
    with torch.no_grad():  # a unit whose weights are all zero is the least important
        layer.intermediate.dense.weight[j] = 0
        layer.intermediate.dense.bias[j] = 0
        layer.output.dense.weight[:, j] = 0
    hm, nm = masks_for("magnitude", 0.02, 0.5, 1, pretrained=tiny)
    assert nm[1, j] == 0 and int((nm == 0).sum()) == round(0.02 * nm.numel())


def test_masks_for_each_scorer_prunes_the_same_fraction(tiny):
    ga, gu = np.random.default_rng(0).random((3, 2, 4)), np.random.default_rng(1).random((3, 2, 4))
    na, nu = np.random.default_rng(2).random((3, 2, 37)), np.random.default_rng(3).random((3, 2, 37))
    sc = Scores(ga, gu, na, nu, meta={})
    masks = {s: masks_for(s, 0.25, 0.5, 7, scores=sc, pretrained=tiny) for s in ("align_uniform", "random", "magnitude")}
    for hm, nm in masks.values():
        assert int((hm == 0).sum()) == 2 and int((nm == 0).sum()) == 19  # 0.25 · 74 = 18.5, halves round up
    assert not torch.equal(masks["random"][1], masks["align_uniform"][1])
    from sparsecse import SparseCSEError

    with pytest.raises(SparseCSEError, match="needs the importance scores"):
        masks_for("align_uniform", 0.25, 0.5, 7, pretrained=tiny)


def test_cli_score_truncates_like_the_sweep_so_both_give_the_same_masks(tiny_model_dir, tiny_data_dir, tmp_path):
    """`sparsecse score` runs the sweep's scoring function (method.score.score_importance): label-free by default
    as the sweep, STS-B pairs with --source stsb, truncated at train.max_len (the CLI's --max-len defaults to it):
    equal scores, so equal masks either way."""
    from sparsecse.cli import main
    from sparsecse.core.config import load_config
    from sparsecse.method.data import load_stsb
    from sparsecse.method.model import load_encoder
    from sparsecse.method.score import compute_scores, load_scores

    from sparsecse.method.score import score_importance

    enc = load_encoder(str(tiny_model_dir))
    pairs = load_stsb(tiny_data_dir, "train")
    assert max(len(t) for t in enc.tokenizer(pairs.s1 + pairs.s2)["input_ids"]) > 12  # truncation bites
    for source in ("unlabeled", "stsb"):  # the CLI's default is the sweep's: label-free
        cfg = load_config(None, ["score.max_pairs=48", "score.batch_size=16", "train.max_len=12",
                                 f"score.source={source}"])
        sweep_scores, _ = score_importance(enc, cfg, tiny_data_dir)  # what the sweep's scoring stage runs
        out = tmp_path / f"{source}.parquet"
        assert main(["score", "--model", str(tiny_model_dir), "--out", str(out), "--data-dir", str(tiny_data_dir),
                     "--max-pairs", "48", "--batch-size", "16", "--max-len", "12"]
                    + (["--source", "stsb"] if source == "stsb" else [])) == 0
        cli = load_scores(str(out))
        assert cli.meta["num_batches"] == sweep_scores.meta["num_batches"]
        for lam in (0.25, 0.75):
            for a, b in zip(cli.importance(lam), sweep_scores.importance(lam)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_positive_pairs_follow_simcse_strictly_above_4_unless_configured():
    from sparsecse.core.config import load_config
    from sparsecse.method.data import positives

    gold = np.array([3.9, 4.0, 4.2, 5.0])
    assert positives(gold).tolist() == [False, False, True, True]  # SimCSE §5: "a score higher than 4"
    assert positives(gold, rule="ge").tolist() == [False, True, True, True]
    assert load_config(None).score.positive_rule == "gt"
    assert load_config(None, ["score.positive_rule=ge"]).score.positive_rule == "ge"


def test_label_free_scoring_uses_dropout_views_of_unlabeled_sentences(tiny, tiny_data_dir):
    from sparsecse.core.config import load_config
    from sparsecse.method.score import compute_scores
    from sparsecse.method.score import scoring_pairs

    cfg = load_config(None, ["score.source=unlabeled", "score.max_pairs=24", "score.batch_size=8"])
    pairs, leak = scoring_pairs(cfg, tiny_data_dir)
    assert len(pairs) == 24 and pairs.s1 == pairs.s2 and leak == 0 and np.isinf(pairs.gold).all()
    sc = compute_scores(tiny, pairs, batch_size=8, dropout_views=True, max_len=32)
    h, n = sc.importance(0.5)
    # dropout on: a sentence's two views differ, so the alignment term is finite and has a gradient
    assert np.isfinite(h).all() and np.isfinite(n).all() and np.abs(sc.g_align_head).sum() > 0
    assert sc.meta["positives"] == "dropout views" and sc.meta["positive_pairs"] == 24
    assert not tiny.training  # the model's mode is restored


def test_stsb_scoring_reports_its_overlap_with_sts12_16_test_pairs(data_dir):
    """The paper's setting reads STS-B train pairs chosen by their labels; many are verbatim STS12–16 test pairs
    (STS-B is built from STS 2012–2017). The overlap is measured, not assumed."""
    from sparsecse.core.config import load_config
    from sparsecse.method.data import load_sts_task
    from sparsecse.method.score import scoring_pairs

    pairs, leak = scoring_pairs(load_config(None, ["score.source=stsb", "score.max_pairs=400"]), data_dir)
    assert 0 < leak <= 400
    # one of them, checked by hand against the STS12–16 files
    test = {(a, b) for y in ("STS12", "STS13", "STS14", "STS15", "STS16") for p in load_sts_task(data_dir, y).values()
            for a, b in zip(p.s1, p.s2)}
    assert any((a, b) in test or (b, a) in test for a, b in zip(pairs.s1, pairs.s2))


def test_pilot_prunes_the_trained_model_without_retraining(tiny, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    import json

    from sparsecse.cli import main
    from sparsecse.method.evaluate import evaluate_sts
    from sparsecse.study.pilot import pilot
    from sparsecse.method.score import compute_scores, save_scores
    from sparsecse.method.data import load_stsb

    tasks = ("STSBenchmark",)
    sc = compute_scores(tiny, load_stsb(tiny_data_dir, "train"), batch_size=16, max_pairs=48, max_len=32)
    rows = pilot(tiny, sc, tiny_data_dir, [0.0, 0.5], scorers=("align_uniform", "random"), sts={"tasks": tasks})
    assert [(r["scorer"], r["sparsity"]) for r in rows] == [("align_uniform", 0.0), ("align_uniform", 0.5),
                                                            ("random", 0.0), ("random", 0.5)]
    full = evaluate_sts(tiny, tiny_data_dir, tasks=tasks)
    assert rows[0]["STSBenchmark"] == pytest.approx(full["STSBenchmark"]) == pytest.approx(rows[2]["STSBenchmark"])
    assert rows[1]["STSBenchmark"] != pytest.approx(full["STSBenchmark"])  # half the units gone changes the model
    assert bool((tiny.head_mask == 1).all()) and bool((tiny.neuron_mask == 1).all())  # masks restored
    save_scores(sc, tmp_path / "s.parquet")
    assert main(["pilot", "--model", str(tiny_model_dir), "--scores", str(tmp_path / "s.parquet"), "--sparsities",
                 "0.3", "--tasks", "STSBenchmark", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "p")]) == 0
    saved = json.loads((tmp_path / "p" / "pilot.json").read_text())
    assert len(saved["rows"]) == 6 and (tmp_path / "p" / "pilot.png").read_bytes()[:4] == b"\x89PNG"  # 3 scorers × {0, 0.3}
    assert "| magnitude | 30% |" in capsys.readouterr().out
    assert main(["pilot", "--model", str(tiny_model_dir), "--scores", str(tmp_path / "s.parquet"), "--sparsities",
                 "0.3", "--tasks", "STSBenchmark", "--data-dir", str(tiny_data_dir), "--scorers", "align_uniform",
                 "--normalize", "none", "layer"]) == 0  # both readings, one curve each; s = 0 evaluated once
    out = capsys.readouterr().out
    assert "| align_uniform | 30% |" in out and "| align_uniform (normalize=layer) | 30% |" in out
    rc = main(["pilot", "--model", str(tiny_model_dir), "--scores", str(tmp_path / "s.parquet"), "--sparsities", "1.5",
               "--data-dir", str(tiny_data_dir)])
    assert rc == 2 and "--sparsities 1.5" in capsys.readouterr().err


def test_simcse_control_is_the_taylor_score_of_infonce(tiny, tiny_data_dir):
    """The SimCSE scorer's importance = E_batches |∂L_InfoNCE/∂mask| (checked against a direct computation with
    the same dropout draws), the same for every λ; masks_for uses it."""
    from sparsecse.method.losses import info_nce
    from sparsecse.method.score import compute_infonce_scores, scoring_order

    sents = [f"sentence number {i} about topic {i % 3}" for i in range(12)]
    sc = compute_infonce_scores(tiny, sents, batch_size=6, temperature=0.05, pooler="cls", seed=0)
    assert np.array_equal(sc.importance(0.25)[0], sc.importance(0.75)[0]) and sc.meta["loss"] == "infonce"
    torch.manual_seed(0)  # the same dropout draws (they come from the scoring seed), by hand
    tiny.train()
    order = scoring_order(len(sents), 0, None)
    direct = np.zeros(tiny.head_mask.shape)
    with tiny.mask_grads() as (hm, nm):
        for b in (order[:6], order[6:]):
            tok = tiny.tokenize([sents[i] for i in b] * 2)
            z = tiny(tok["input_ids"], tok["attention_mask"], pooler="cls")
            g, = torch.autograd.grad(info_nce(z[:6], z[6:], 0.05), [hm])
            direct += g.abs().double().numpy() / 2
    tiny.eval()
    np.testing.assert_allclose(sc.importance(0.5)[0], direct, rtol=1e-5, atol=1e-9)
    hm, nm = masks_for("simcse", 0.25, 0.5, 1, pretrained=tiny, simcse_scores=sc)
    assert int((hm == 0).sum()) == 2
    from sparsecse import SparseCSEError

    with pytest.raises(SparseCSEError, match="needs the InfoNCE scores"):
        masks_for("simcse", 0.25, 0.5, 1, pretrained=tiny)


def test_readings_as_a_grid_dimension_and_one_value_where_one_mask_is_built(tmp_path, capsys):
    """score.combine / score.normalize lists are grid dimensions: the paper's score runs under every combination,
    the control scorers (one score each, no λ) under each normalize only, the s = 0 control once; each point has
    its own trial name. `sparsecse prune` builds one mask, so a list there is a one-line error."""
    from sparsecse.cli import main
    from sparsecse.core.config import load_config
    from sparsecse.core.results import Point, grid_points

    cfg = load_config(None, ["sweep.sparsities=[0, 0.1]", "sweep.lams=[0.25, 0.75]", "sweep.seeds=[1]",
                             "sweep.scorers=[align_uniform, random]", "score.combine=[gradient, score]",
                             "score.normalize=[none, layer]", "sweep.control_seeds=0"])
    pts = grid_points(cfg)
    key = lambda p: (p.sparsity, p.scorer, p.combine, p.normalize, p.lam)  # noqa: E731
    assert sorted(map(key, pts)) == sorted(
        [(0.0, "align_uniform", "gradient", "none", 0.25)]
        + [(0.1, "align_uniform", c, n, lam) for c in ("gradient", "score") for n in ("none", "layer") for lam in (0.25, 0.75)]
        + [(0.1, "random", "gradient", n, 0.25) for n in ("none", "layer")])
    names = {p.name for p in pts}
    assert len(names) == len(pts) and "s0.100_l0.25_combine-score_norm-layer_seed1" in names
    assert "s0.100_random_norm-layer_seed1" in names and "s0.000_l0.25_seed1" in names
    # the names of sweeps run before the readings (or the scorers) were parameters are unchanged
    old = Point.from_params({"point": {"sparsity": 0.1, "lam": 0.5, "seed": 3}})
    assert old == Point(0.1, 0.5, 3, "align_uniform", "gradient", "none") and old.name == "s0.100_l0.50_seed3"
    assert Point.from_params({"sparsity": 0.1, "lam": 0.5, "seed": 3}, reading=("score", "layer")).normalize == "layer"
    assert Point.from_params(old.params()) == old  # Tune's parameters round-trip
    assert load_config(None, ["score.normalize=layer"]).score.normalize == ("layer",)  # one value still reads
    (tmp_path / "c.yaml").write_text("score: {normalize: [none, layer]}\n")
    rc = main(["prune", "--pretrained", "minilm", "--scores", str(tmp_path / "s.parquet"), "--sparsity", "0.1",
               "--lam", "0.5", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "score.normalize" in err and "one value" in err and len(err.strip().splitlines()) == 1


def test_every_control_is_ranked_under_the_normalize_reading(tiny):
    """normalize=layer applies to the controls' scores as to the paper's: magnitude's allocation across layers
    follows the per-layer-normalised weight norms (a different mask from the raw ranking)."""
    from sparsecse.method.score import per_layer_l2

    head, neuron = magnitude_importance(tiny)
    for normalize, (h, n) in (("none", (head, neuron)), ("layer", (per_layer_l2(head), per_layer_l2(neuron)))):
        got = masks_for("magnitude", 0.4, 0.5, 1, pretrained=tiny, normalize=normalize)
        want = select_masks(h, n, 0.4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    rh, rn = random_importance(*tiny.head_mask.shape, tiny.neuron_mask.shape[1], 3)
    got = masks_for("random", 0.4, 0.5, 3, pretrained=tiny, normalize="layer")
    assert torch.equal(got[1], select_masks(per_layer_l2(rh), per_layer_l2(rn), 0.4)[1])


def test_label_free_scores_are_the_same_for_the_same_seed_and_leave_the_callers_rng_alone(tiny, tiny_data_dir):
    """Dropout makes the two views of a sentence: its draws come from score.seed, so a sweep that scores again
    (a resume, a rerun, another machine) gets the same masks; another seed gives other draws."""
    from sparsecse.method.data import unlabeled_pairs
    from sparsecse.method.score import compute_infonce_scores, compute_scores

    pairs = unlabeled_pairs(tiny_data_dir / "wiki" / "wiki1m_sample.txt", 24, 0)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = compute_scores(tiny, pairs, batch_size=8, dropout_views=True, seed=5)
    after = torch.rand(3)
    b = compute_scores(tiny, pairs, batch_size=8, dropout_views=True, seed=5)
    c = compute_scores(tiny, pairs, batch_size=8, dropout_views=True, seed=6)
    assert torch.equal(before, after)  # the caller's random stream is untouched
    np.testing.assert_array_equal(a.g_align_head, b.g_align_head)
    np.testing.assert_array_equal(a.g_uniform_neuron, b.g_uniform_neuron)
    assert not np.array_equal(a.g_align_head, c.g_align_head)
    s1 = compute_infonce_scores(tiny, pairs.s1, batch_size=8, seed=2)
    s2 = compute_infonce_scores(tiny, pairs.s1, batch_size=8, seed=2)
    np.testing.assert_array_equal(s1.g_align_neuron, s2.g_align_neuron)


def test_older_records_are_read_in_one_place_and_an_unknown_kind_is_a_bug():
    """results.upgrade_record: a pilot row without a method (before the readings were a dimension), a scoring note
    without its positive-pair count, a trial's parameters nested under "point" — each in today's shape; the report
    and the pilot figure read them through it."""
    from sparsecse.core.results import upgrade_record
    from sparsecse.study.pilot import row_method

    old_row = {"scorer": "random", "sparsity": 0.1, "avg": 50.0}
    assert upgrade_record("pilot_row", old_row)["method"] == "random" == row_method(old_row)
    assert row_method({**old_row, "method": "align_uniform/score"}) == "align_uniform/score"  # today's rows as they are
    assert upgrade_record("scoring", {"split": "train"}) == {"positive_pairs": None, "split": "train"}
    assert upgrade_record("scoring", {"positive_pairs": 12})["positive_pairs"] == 12
    p = upgrade_record("point", {"point": {"sparsity": 0.2, "lam": 0.5, "seed": 1}}, reading=("score", "layer"))
    assert (p["scorer"], p["combine"], p["normalize"], p["replicate"]) == ("align_uniform", "score", "layer", 0)
    with pytest.raises(ValueError, match="unknown record kind 'trial'"):
        upgrade_record("trial", {})
