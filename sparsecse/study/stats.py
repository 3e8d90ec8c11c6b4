"""The statistics behind the report's claims: spread over seeds, paired tests over seeds, and — for single runs —
a paired bootstrap over STS test pairs.

A difference between two methods is credited only when its test says so; everything else is "within noise".
"""

from __future__ import annotations

import numpy as np

from ..method.evaluate import spearman

ALPHA = 0.05


def sample_std(xs) -> float | None:
    """Sample standard deviation (ddof = 1) over seeds; None with fewer than two (no spread to show)."""
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else None


EXACT_BELOW = 10  # pairs: below this many, the exact sign-flip test decides (the t-test's normality is a guess)


def holm(pvals: list) -> list:
    """Holm's step-down adjustment of a family of p-values (None entries are not tests and stay None): the k-th
    smallest of m is multiplied by m − k + 1, then made monotone and capped at 1. Controls the family-wise error
    rate at α without assuming independence."""
    idx = sorted((i for i, p in enumerate(pvals) if p is not None), key=lambda i: pvals[i])
    m, out, running = len(idx), list(pvals), 0.0
    for k, i in enumerate(idx):
        running = max(running, min(1.0, (m - k) * pvals[i]))
        out[i] = running
    return out


def sign_flip(d) -> float:
    """Exact two-sided paired permutation (sign-flip) test of mean(d) = 0: the share of the 2^n sign patterns whose
    |mean| is at least the observed one. Its smallest attainable value is 2 / 2^n (sign_flip_floor)."""
    import itertools

    d = np.asarray(d, dtype=float)
    obs = abs(d.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return float(np.mean(np.abs((signs * np.abs(d)).mean(1)) >= obs - 1e-12))


def sign_flip_floor(n: int) -> float:
    return min(1.0, 2.0 / 2 ** n)


def paired(a: dict, b: dict, exact_below: int = EXACT_BELOW) -> dict:
    """Paired comparison over the units both have ({unit: value}, a unit is a seed or a stage-1 replicate): mean
    and sample std of a − b, its 95 % t interval (lo, hi), a two-sided paired t-test (p_t) and the exact sign-flip
    test (p_exact, with the smallest p it can reach, p_floor). `p` is the exact test's below EXACT_BELOW pairs, the
    t-test's from there (`test` names it); "within noise" unless p < 0.05 — before any correction for the family
    the comparison belongs to (`correct_family`). One shared unit gives a difference but no test."""
    seeds = sorted(set(a) & set(b))
    d = [a[k] - b[k] for k in seeds]
    out = {"n": len(d), "diff": float(np.mean(d)) if d else None, "std": sample_std(d), "p": None}
    if len(d) < 2:
        out["verdict"] = "one seed: no spread, no claim" if d else "no shared seeds"
        return out
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, len(d) - 1)) * out["std"] / np.sqrt(len(d))  # the 95 % t interval
    out["lo"], out["hi"] = out["diff"] - half, out["diff"] + half
    if out["std"] == 0:
        out["p_t"] = 1.0 if out["diff"] == 0 else 0.0
    else:
        from scipy.stats import ttest_rel

        out["p_t"] = float(ttest_rel([a[k] for k in seeds], [b[k] for k in seeds]).pvalue)
    out["p_exact"], out["p_floor"] = sign_flip(d), sign_flip_floor(len(d))
    exact = len(d) < exact_below
    out["test"] = "exact sign-flip" if exact else "paired t"
    out["p"] = out["p_exact"] if exact else out["p_t"]
    out["verdict"] = _verdict(out["p"], out["diff"])
    return out


def noninferior(a: dict, b: dict, margin: float, exact_below: int = EXACT_BELOW) -> dict:
    """One-sided paired test over shared units ({unit: value}) that a is not worse than b by `margin` or more:
    H0 mean(a − b) ≤ −margin against H1 mean(a − b) > −margin. Below EXACT_BELOW pairs the exact one-sided
    sign-flip test of d = a − b + margin (smallest p 1/2^n), else the one-sided t-test. One unit: no test — the
    point estimate decides and says so. `passed`: H0 rejected at α (or, with one unit, d ≥ 0)."""
    units = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] + margin for k in units])
    out = {"n": len(d), "diff": float(d.mean() - margin) if len(d) else None, "margin": margin, "p": None}
    if len(d) < 2:
        out["test"] = "one unit: point estimate, no test" if len(d) else "no shared units"
        out["passed"] = bool(len(d) and d[0] >= 0)
        return out
    if len(d) < exact_below:
        import itertools

        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        out["p"] = float(np.mean((signs * np.abs(d)).mean(1) >= d.mean() - 1e-12))
        out["test"] = "exact one-sided sign-flip"
    else:
        from scipy.stats import ttest_1samp

        out["p"] = float(ttest_1samp(d, 0.0, alternative="greater").pvalue) if d.std() > 0 else float(d.mean() <= 0)
        out["test"] = "one-sided t"
    out["passed"] = out["p"] < ALPHA
    return out


def correct_family(tests: list[dict]) -> int:
    """Holm-adjusts the p of every test in `tests` (dicts as `paired`/`bootstrap_diff` return; those without a p
    take no part) as one family: each gets p_raw, p (adjusted), family (its size) and the verdict from the
    adjusted p. Returns the family's size."""
    family = [t for t in tests if t is not None and t.get("p") is not None]
    adjusted = holm([t["p"] for t in family])
    for t, p in zip(family, adjusted):
        t["p_raw"], t["p"], t["family"] = t["p"], p, len(family)
        t["verdict"] = _verdict(p, t["diff"])
    return len(family)


def _verdict(p: float, diff: float) -> str:
    return "within noise" if p >= ALPHA else ("better" if diff > 0 else "worse")


def resampled_ranks(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank, as scipy's rankdata) of `values[idx]`, row by row of the
    (replicates, n) index array — by counting, in O(n) per row, since every row draws from the same values."""
    groups, dense = np.unique(values, return_inverse=True)
    g = len(groups)
    d = dense.reshape(-1)[idx]
    counts = np.bincount((d + g * np.arange(len(idx))[:, None]).ravel(), minlength=g * len(idx)).reshape(len(idx), g)
    cum = np.cumsum(counts, axis=1)
    return np.take_along_axis(cum - (counts - 1) / 2.0, d, axis=1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(1, keepdims=True)
    y = y - y.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))


def bootstrap_diff(a: dict[str, tuple], b: dict[str, tuple], n_boot: int = 1000, seed: int = 0,
                   chunk: int = 100, null: float = 0.0, alternative: str = "two-sided") -> dict:
    """Paired bootstrap over test pairs for two models evaluated on the same pairs: ({task: (pred, gold)} each, as
    `evaluate.sts_predictions` gives). Each replicate resamples every task's pairs with replacement — the same
    indices for both models — and recomputes the STS average (mean over tasks of Spearman × 100). Returns the
    observed difference a − b, the 95 % percentile interval, a p (two-sided: twice the smaller tail of the
    replicate differences around `null`, 0 by default; "greater": the share at or below `null`) and the verdict.
    This measures the noise of the test set, not of training: it is what one seed can support."""
    tasks = [t for t in a if t in b]
    if not tasks:
        raise ValueError("bootstrap_diff: the two models share no STS task")
    for t in tasks:
        if len(a[t][1]) != len(b[t][1]) or not np.array_equal(a[t][1], b[t][1]):
            raise ValueError(f"bootstrap_diff: {t}: the two models were evaluated on different pairs")
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n_boot)
    for t in tasks:
        (pa, gold), (pb, _) = a[t], b[t]
        n = len(gold)
        for lo in range(0, n_boot, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_boot - lo), n))
            rg = resampled_ranks(gold, idx)  # Spearman's ρ = Pearson's r of the ranks
            diffs[lo:lo + len(idx)] += 100.0 * (_pearson_rows(resampled_ranks(pa, idx), rg)
                                                - _pearson_rows(resampled_ranks(pb, idx), rg))
    diffs /= len(tasks)

    observed = float(np.mean([100.0 * (spearman(a[t][0], a[t][1]) - spearman(b[t][0], b[t][1])) for t in tasks]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    if alternative == "greater":  # H1: the difference exceeds `null` (non-inferiority: null = −margin)
        p = float(np.mean(diffs <= null))
    else:
        p = float(min(1.0, 2 * min(np.mean(diffs <= null), np.mean(diffs >= null))))
    return {"diff": observed, "lo": float(lo), "hi": float(hi), "p": p, "n_boot": n_boot, "tasks": tasks,
            "verdict": _verdict(p, observed)}


Z_ONE_SIDED = 1.6448536269514722  # the standard normal's 95th percentile: a one-sided bound at α = 0.05


def noninferior_runs(point: list[tuple], control: list[tuple], margin: float, n_boot: int = 1000,
                     seed: int = 0) -> dict:
    """Is a pruned point within `margin` Spearman × 100 points of the control on one set of pairs, counting both
    kinds of noise? `point`, `control`: each training run's (pred, gold) on the same pairs. The difference of the
    mean Spearmans has a standard error made of the pairs' noise (a paired bootstrap: every run resampled with the
    same indices) and training noise (the control runs' sample variance s², as s²/n for each side's mean);
    `passed` when diff − z₀.₉₅ · SE > −margin (one-sided, α = 0.05). Fewer than two control runs cannot estimate
    training noise: never passed."""
    gold = control[0][1]
    for _, g in (*point, *control):
        if len(g) != len(gold) or not np.array_equal(g, gold):
            raise ValueError("noninferior_runs: the runs were evaluated on different pairs")
    rho = lambda runs: [100.0 * spearman(p, gold) for p, _ in runs]  # noqa: E731
    rp, rc = rho(point), rho(control)
    diff = float(np.mean(rp) - np.mean(rc))
    out = {"diff": diff, "n_point": len(point), "n_control": len(control), "pairs": len(gold),
           "seed_sd": sample_std(rc)}
    if len(control) < 2:
        return {**out, "se": None, "lower": None, "passed": False,
                "why": "one control run: training noise cannot be estimated"}
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for lo in range(0, n_boot, 100):
        idx = rng.integers(0, len(gold), size=(min(100, n_boot - lo), len(gold)))
        rg = resampled_ranks(gold, idx)
        mean = lambda runs: np.mean([_pearson_rows(resampled_ranks(p, idx), rg) for p, _ in runs], axis=0)  # noqa
        boot[lo:lo + len(idx)] = 100.0 * (mean(point) - mean(control))
    se_pairs = float(np.std(boot, ddof=1))
    s2 = out["seed_sd"] ** 2
    se = float(np.sqrt(se_pairs ** 2 + s2 / len(point) + s2 / len(control)))
    lower = diff - Z_ONE_SIDED * se
    return {**out, "se": se, "se_pairs": se_pairs, "lower": lower, "passed": bool(lower > -margin)}


Z_POWER = 0.8416212335729143  # the standard normal's 80th percentile: a test that passes 4 times in 5


def what_it_would_take(t: dict, margin: float, max_seeds: int = 20) -> dict:
    """Why a noninferior_runs test `t` failed, and what would let a point truly at its difference pass 4 times in 5
    (80 % power, under the normal approximation the test itself uses: pair noise falls as 1/√pairs, training noise
    as s²/runs on each side). {"verdict": "worse"} when the estimate itself is beyond the margin (the data say the
    point costs more than it allows); else {"verdict": "not shown", "margin_needed": the margin at which it would on
    these pairs and runs, "pairs_needed": the choice pairs at which it would with these runs, "seeds_needed": the
    seeds (runs of the point; the control keeps its extra retrainings) at which it would on these pairs, and
    "seeds_and_pairs": [seeds, pairs] when neither alone would, the fewest seeds that leave the pairs half the
    variance} — None where that way cannot (within max_seeds)."""
    if t.get("se") is None:
        return {"verdict": "not shown", "margin_needed": None, "pairs_needed": None, "seeds_needed": None,
                "seeds_and_pairs": None}
    if t["diff"] <= -margin:
        return {"verdict": "worse"}
    z = Z_ONE_SIDED + Z_POWER
    target2 = ((t["diff"] + margin) / z) ** 2
    s2, p2, n0, extra = t["seed_sd"] ** 2, t["se_pairs"] ** 2, t["n_point"], t["n_control"] - t["n_point"]

    def train2(k: int) -> float:  # the training-noise variance with k runs of the point, k + extra of the control
        return s2 * (1 / k + 1 / (k + extra))

    def pairs_at(k: int) -> int | None:
        room = target2 - train2(k)
        return int(np.ceil(t["pairs"] * p2 / room)) if room > 0 and p2 > 0 else None

    seeds = next((k for k in range(n0 + 1, max_seeds + 1) if p2 + train2(k) <= target2), None)
    pairs = pairs_at(n0)
    # both: the fewest seeds that leave half the variance to the pairs (a balanced ask, not the least of either)
    both = next((k for k in range(n0 + 1, max_seeds + 1) if train2(k) <= target2 / 2), None)
    return {"verdict": "not shown", "margin_needed": float(z * t["se"] - t["diff"]), "pairs_needed": pairs,
            "seeds_needed": seeds,
            "seeds_and_pairs": [both, pairs_at(both)] if both and not (pairs or seeds) else None}
