"""The pre-registered study's analysis (benchmarks/study.py, docs/study.md) on hand-made results: H1 non-inferiority
with Holm over two sparsities, H2/H3 as one Holm family, the labelled run paired with the label-free controls."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from benchmarks.study import analyse, by_replicate, markdown

CTRL = [75.0, 75.4, 74.8, 75.2, 75.1]


def _trials(offset: dict, scorer="align_uniform", combine="gradient", normalize="none") -> list[dict]:
    return [{"trial": f"s{s}_{scorer}_{combine}_{normalize}_rep{r}", "status": "done", "sparsity": s, "scorer": scorer,
             "combine": combine, "normalize": normalize, "replicate": r, "test/avg": CTRL[r] + off[r]}
            for s, off in offset.items() for r in range(5)]


def _labelfree() -> list[dict]:
    rows = _trials({0.0: [0.0] * 5})
    rows += _trials({0.02: [0.1, 0.2, -0.1, 0.3, 0.0], 0.1: [-0.2, -0.4, -0.1, -0.3, -0.2]})
    rows += _trials({0.02: [-1.0, -1.5, -0.8, -1.2, -1.1], 0.1: [-2.0, -2.5, -1.8, -2.2, -2.1]}, scorer="random")
    rows += _trials({0.02: [-0.5] * 5, 0.1: [-1.0] * 5}, scorer="magnitude")
    return rows


def test_the_primary_cell_by_hand():
    res = analyse(_labelfree(), _trials({0.02: [0.0] * 5, 0.1: [0.0] * 5}), [0.02, 0.1])
    rows = res["t"]["primary"]["rows"]
    two, ten = rows
    assert two["control"] == pytest.approx(np.mean(CTRL)) and two["n"] == 5
    # H1 at 2 %: d + 0.5 = (0.6, 0.7, 0.4, 0.8, 0.5) → one-sided t; Holm over the two H1 tests
    d2, d10 = np.array([0.1, 0.2, -0.1, 0.3, 0.0]) + 0.5, np.array([-0.2, -0.4, -0.1, -0.3, -0.2]) + 0.5
    p2 = sps.ttest_1samp(d2, 0, alternative="greater").pvalue
    p10 = sps.ttest_1samp(d10, 0, alternative="greater").pvalue
    lo, hi = sorted([p2, p10])
    holm = {p2: min(1, 2 * lo) if p2 == lo else max(2 * lo, hi), p10: min(1, 2 * lo) if p10 == lo else max(2 * lo, hi)}
    assert two["H1"]["p_raw"] == pytest.approx(p2) and two["H1"]["p"] == pytest.approx(holm[p2])
    assert ten["H1"]["p"] == pytest.approx(holm[p10]) and two["H1"]["passed"] and ten["H1"]["passed"]
    # H2/H3: four two-sided paired t-tests, one Holm family
    assert two["H2"]["p_raw"] == pytest.approx(sps.ttest_rel(CTRL + np.array([0.1, 0.2, -0.1, 0.3, 0.0]),
                                                             CTRL + np.array([-1.0, -1.5, -0.8, -1.2, -1.1])).pvalue)
    assert two["H2"]["family"] == 4 and two["H2"]["verdict"] == "better"
    assert "| 2% | 5 |" in markdown(res)
    # the exact sensitivity analysis cannot go below 2/32 two-sided at n = 5: nothing is credited there
    assert res["exact"]["primary"]["rows"][0]["H2"]["p_raw"] == pytest.approx(0.0625)
    assert res["exact"]["primary"]["rows"][0]["H2"]["verdict"] == "within noise"


def test_the_labelled_cell_pairs_with_the_labelfree_controls():
    labelled = _trials({0.02: [0.5] * 5, 0.1: [0.6, 0.4, 0.5, 0.7, 0.5]})
    res = analyse(_labelfree(), labelled, [0.02, 0.1])
    row = res["t"]["labelled"]["rows"][0]
    assert row["mean"] == pytest.approx(np.mean(CTRL) + 0.5) and row["random"] == pytest.approx(np.mean(CTRL) - 1.12)
    assert row["H3"]["diff"] == pytest.approx(0.5)
    assert by_replicate(labelled, sparsity=0.1)[3] == pytest.approx(CTRL[3] + 0.7)
