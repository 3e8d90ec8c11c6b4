"""The statistics the report's claims rest on: paired tests over seeds, and the paired bootstrap over STS test
pairs for single runs (checked against a direct resampling with scipy)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from sparsecse.study.stats import bootstrap_diff, paired, resampled_ranks


def test_paired_comparison_over_seeds():
    a, b = {1: 80.0, 2: 81.0, 3: 83.0, 4: 70.0}, {1: 79.0, 2: 80.5, 3: 81.0}  # seed 4 has no partner
    c = paired(a, b)
    assert c["n"] == 3 and c["diff"] == pytest.approx(np.mean([1.0, 0.5, 2.0]))
    assert c["std"] == pytest.approx(np.std([1.0, 0.5, 2.0], ddof=1))
    assert c["p_t"] == pytest.approx(sps.ttest_rel([80, 81, 83], [79, 80.5, 81]).pvalue)
    # three pairs: the exact sign-flip test decides, and it cannot go below 2/2^3 = 0.25 (all 3 signs agree)
    assert c["test"] == "exact sign-flip" and c["p"] == c["p_exact"] == c["p_floor"] == 0.25
    assert c["verdict"] == "within noise"
    big = paired({1: 80.0, 2: 81.0, 3: 82.0}, {1: 70.0, 2: 71.5, 3: 71.0})
    assert big["p_t"] < 0.01 and big["verdict"] == "within noise"  # a t-test would claim it; 3 seeds cannot
    ten = paired({k: 80.0 + k % 3 for k in range(10)}, {k: 70.0 + (k * 7) % 5 for k in range(10)})
    assert ten["test"] == "paired t" and ten["p"] == ten["p_t"] and ten["verdict"] == "better"
    assert paired({1: 80.0}, {1: 70.0})["verdict"].startswith("one seed")


def test_the_exact_sign_flip_test_against_hand_counted_patterns():
    from sparsecse.study.stats import sign_flip, sign_flip_floor

    # d = (1, 2, 3): 8 sign patterns, |mean| >= 2 only for (+,+,+) and (−,−,−): p = 2/8
    assert sign_flip([1.0, 2.0, 3.0]) == 0.25 == sign_flip_floor(3)
    # d = (3, −1, 1, 1): |sum| >= 4 for ±(3,−1,1,1) and ±(3,1,1,1), ±(3,1,−1,1), ±(3,1,1,−1): sums 4, 6, 4, 4 → 8/16
    assert sign_flip([3.0, -1.0, 1.0, 1.0]) == 0.5
    assert sign_flip_floor(5) == 0.0625 and sign_flip_floor(6) == 0.03125  # five replicates can never reach 0.05


def test_holm_against_hand_computed_values():
    from sparsecse.study.stats import correct_family, holm

    # sorted 0.01, 0.02, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.04, 0.06, 0.06, 0.04 → monotone 0.04, 0.06, 0.06, 0.06
    assert holm([0.03, 0.01, None, 0.04, 0.02]) == pytest.approx([0.06, 0.04, None, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == [] and holm([None]) == [None]
    # BENCHMARKS 6d's two best raw p-values in its family of 14: 0.018 → 0.252 and 0.030 → 0.39
    assert holm([0.018, 0.030] + [0.5] * 12)[:2] == pytest.approx([0.252, 0.39])
    tests = [{"p": 0.01, "diff": 1.0}, {"p": 0.04, "diff": -1.0}, {"p": None, "diff": 0.5}, None]
    assert correct_family(tests) == 2
    assert tests[0] == {"p_raw": 0.01, "p": 0.02, "diff": 1.0, "family": 2, "verdict": "better"}
    assert tests[1]["p"] == 0.04 and tests[1]["verdict"] == "worse" and "family" not in tests[2]


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
