"""The statistics the report's claims rest on: paired tests over seeds, and the paired bootstrap over STS test
pairs for single runs (checked against a direct resampling with scipy)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from sparsecse.stats import bootstrap_diff, paired, resampled_ranks


def test_paired_comparison_over_seeds():
    a, b = {1: 80.0, 2: 81.0, 3: 83.0, 4: 70.0}, {1: 79.0, 2: 80.5, 3: 81.0}  # seed 4 has no partner
    c = paired(a, b)
    assert c["n"] == 3 and c["diff"] == pytest.approx(np.mean([1.0, 0.5, 2.0]))
    assert c["std"] == pytest.approx(np.std([1.0, 0.5, 2.0], ddof=1))
    assert c["p"] == pytest.approx(sps.ttest_rel([80, 81, 83], [79, 80.5, 81]).pvalue)
    assert c["verdict"] == "within noise"  # +1.17 over 3 seeds with this spread: p ≈ 0.12
    assert paired({1: 80.0, 2: 81.0, 3: 82.0}, {1: 70.0, 2: 71.5, 3: 71.0})["verdict"] == "better"
    assert paired({1: 80.0}, {1: 70.0})["verdict"].startswith("one seed")


def test_resampled_ranks_are_scipys_average_ranks_with_ties():
    rng = np.random.default_rng(1)
    values = np.round(rng.normal(size=300), 1)  # many ties, and resampling adds more
    idx = rng.integers(0, 300, size=(7, 300))
    np.testing.assert_allclose(resampled_ranks(values, idx), sps.rankdata(values[idx], axis=1))


def _direct(a, b, n_boot, seed):
    """The same bootstrap, written the slow way: scipy's Spearman on each resample."""
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n_boot)
    for t in a:
        (pa, gold), (pb, _) = a[t], b[t]
        idx = rng.integers(0, len(gold), size=(n_boot, len(gold)))
        diffs += [100 * (sps.spearmanr(pa[i], gold[i])[0] - sps.spearmanr(pb[i], gold[i])[0]) for i in idx]
    return diffs / len(a)


def test_bootstrap_over_test_pairs_equals_a_direct_resampling():
    rng = np.random.default_rng(2)
    gold = {t: np.round(rng.uniform(0, 5, n), 1) for t, n in (("STS16", 250), ("STSBenchmark", 400))}
    a = {t: (g + rng.normal(0, 1.0, len(g)), g) for t, g in gold.items()}
    b = {t: (g + rng.normal(0, 1.3, len(g)), g) for t, g in gold.items()}
    got = bootstrap_diff(a, b, n_boot=200, seed=7, chunk=200)
    diffs = _direct(a, b, 200, 7)
    assert (got["lo"], got["hi"]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-9)
    assert got["p"] == pytest.approx(2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    observed = np.mean([100 * (sps.spearmanr(*a[t])[0] - sps.spearmanr(*b[t])[0]) for t in gold])
    assert got["diff"] == pytest.approx(observed) and got["tasks"] == ["STS16", "STSBenchmark"]


def test_bootstrap_verdicts_and_bad_input():
    rng = np.random.default_rng(3)
    g = np.round(rng.uniform(0, 5, 800), 1)
    noisy = {"STSBenchmark": (g + rng.normal(0, 2.0, 800), g)}
    same = bootstrap_diff(noisy, noisy)
    assert same["diff"] == 0 and same["lo"] == 0 == same["hi"] and same["verdict"] == "within noise"
    better = bootstrap_diff({"STSBenchmark": (g + rng.normal(0, 0.5, 800), g)}, noisy)
    assert better["verdict"] == "better" and better["lo"] > 0 and better["p"] < 0.05
    assert bootstrap_diff(noisy, {"STSBenchmark": (g + rng.normal(0, 0.5, 800), g)})["verdict"] == "worse"
    with pytest.raises(ValueError, match="different pairs"):
        bootstrap_diff(noisy, {"STSBenchmark": (g[:-1], g[:-1])})
    with pytest.raises(ValueError, match="share no STS task"):
        bootstrap_diff(noisy, {"STS12": noisy["STSBenchmark"]})
