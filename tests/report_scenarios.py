"""Synthetic sweep results that reach every section of the report: a multi-seed grid with controls, two readings,
a failed and a stopped trial, transfer, the pilot and the allocation; a Pareto selection; one seed with a bootstrap;
sampled (Optuna) points. tests/golden/report-*.md is what the report said for them before the report was split
(sparsecse 12b9598): the refactor keeps report.md byte for byte."""

from __future__ import annotations

import numpy as np

TASKS = ["STS12", "STSBenchmark", "SICKRelatedness", "avg"]
# the selection data and rule these scenarios were written under (the defaults before the clean selection data)
PAPER_PROTOCOL = ["sweep.select_on=stsb-dev", "sweep.select=noninferior", "sweep.control_seeds=0"]


def row(s, lam, seed, dev, base, scorer="align_uniform", error=None, evaluated=True, combine="gradient",
        normalize="none", params=None, au=True, transfer=False):
    m = {"evaluated": evaluated, "best_stsb_dev": dev, "step": 16, "node_id": "n1", "trial": "x"}
    if evaluated:
        for i, t in enumerate(TASKS[:-1]):
            m[f"test/{t}"] = base + i + 0.1 * seed
        m["test/avg"] = float(np.mean([m[f"test/{t}"] for t in TASKS[:-1]]))
        if au:
            m["align"], m["uniform"] = 0.2 + s / 10 + seed / 100, -2.0 - s + seed / 50
        if transfer:
            m["transfer/MR"], m["transfer/CR"], m["transfer/avg"] = 70 + 10 * s + seed, 75 + seed, 72 + s
    if params is not None:
        m["encoder_params"] = params
    return {"config": {"sparsity": s, "lam": lam, "seed": seed, "scorer": scorer, "combine": combine,
                       "normalize": normalize}, "metrics": m, "error": error,
            "checkpoint": None if error else f"tune/t_{s}_{lam}_{seed}_{scorer}_{normalize}/checkpoint_000002"}


def grid():
    rows = []
    for k in (1, 2, 3):
        rows.append(row(0.0, 0.25, k, 80.0 + k / 10, 70.0, transfer=True))
        for s in (0.1, 0.3):
            for lam in (0.25, 0.75):
                rows.append(row(s, lam, k, 80.0 + s * 3 + lam + k / 7, 70.0 + 5 * s + lam, transfer=True))
                rows.append(row(s, lam, k, 79.5 + s * 4 + k / 9, 71.0 + 3 * s, normalize="layer", transfer=True))
            rows.append(row(s, 0.25, k, 78.0 + k / 5, 65.0 - s, scorer="random"))
            rows.append(row(s, 0.25, k, 77.0 + k / 4, 64.0 + s, scorer="random", normalize="layer"))
            rows.append(row(s, 0.25, k, 78.5, 68.0 + k, scorer="magnitude"))
    rows.append(row(0.5, 0.25, 1, float("nan"), 0, error="training loss became non-finite", evaluated=False))
    rows.append(row(0.5, 0.75, 1, 70.0, 0, evaluated=False))  # stopped by ASHA
    return rows


GRID_OVR = ["score.source=stsb", *PAPER_PROTOCOL, "sweep.sparsities=[0, 0.1, 0.3, 0.5]", "sweep.lams=[0.25, 0.75]", "sweep.seeds=[1, 2, 3]",
            "sweep.scorers=[align_uniform, random, magnitude]", "score.normalize=[none, layer]",
            "eval.tasks=[STS12, STSBenchmark, SICKRelatedness]", "sweep.scheduler=asha", "eval.transfer=true"]


def pareto():
    size = {0.0: 1000, 0.1: 900, 0.3: 700, 0.5: 500}
    dev = {0.0: 80.0, 0.1: 80.6, 0.3: 80.2, 0.5: 78.0}
    rows = [row(s, 0.5, k, dev[s] + (k - 2) / 10, 70.0 + 10 * s, params=size[s]) for s in size for k in (1, 2, 3)]
    rows.append(row(0.5, 0.5, 1, 99.0, 99.0, scorer="random", params=500))
    return rows


PARETO_OVR = ["score.source=stsb", *PAPER_PROTOCOL, "sweep.sparsities=[0, 0.1, 0.3, 0.5]", "sweep.lams=[0.5]", "sweep.seeds=[1, 2, 3]",
              "sweep.objective=pareto", "eval.tasks=[STS12, STSBenchmark, SICKRelatedness]", "sweep.select_lam=0.5"]


def single():
    rng = np.random.default_rng(0)
    gold = np.round(rng.uniform(0, 5, 300), 1)
    names = ["s0.000_l0.50_seed1", "s0.300_l0.50_seed1", "s0.300_random_seed1"]
    noise = [2.0, 1.0, 2.0]
    preds = {n: {"STSBenchmark": (gold + rng.normal(0, z, 300), gold)} for n, z in zip(names, noise)}
    rows = [row(0.0, 0.5, 1, 80.0, 70.0), row(0.3, 0.5, 1, 81.0, 71.0), row(0.3, 0.5, 1, 79.0, 60.0, scorer="random")]
    return rows, preds


SINGLE_OVR = ["score.source=stsb", *PAPER_PROTOCOL, "sweep.sparsities=[0, 0.3]", "sweep.lams=[0.5]", "sweep.seeds=[1]",
              "sweep.scorers=[align_uniform, random]", "eval.tasks=[STS12, STSBenchmark, SICKRelatedness]"]


def sampled():
    rows = [row(0.0, 0.5, k, 80.0, 70.0) for k in (1, 2)]
    rows += [row(s, lam, 1, 80.0 + s, 70.0 + 10 * s - 20 * s * s)
             for s, lam in ((0.013, 0.31), (0.05, 0.62), (0.12, 0.45), (0.3, 0.7), (0.1234567, 0.5))]
    return rows


SAMPLED_OVR = ["score.source=stsb", *PAPER_PROTOCOL, "sweep.search=optuna", "sweep.seeds=[1, 2]", "eval.tasks=[STS12, STSBenchmark, SICKRelatedness]",
               "sweep.num_samples=5"]

BASELINE = {"STS12": 60.0, "STSBenchmark": 75.0, "SICKRelatedness": 70.0, "avg": 68.3, "align": 0.21, "uniform": -2.4}
BACKBONE = {"STS12": 50.0, "STSBenchmark": 65.0, "SICKRelatedness": 60.0, "avg": 58.3, "align": 0.31, "uniform": -1.4}
SCORING = {"positive_pairs": 123, "sts_test_overlap": 17, "model_fingerprint": "abc"}
PILOT = [{"scorer": sc, "method": sc, "sparsity": s, "lam": 0.5 if sc == "align_uniform" else None,
          "STS12": 60 - 10 * s, "STSBenchmark": 70 - 20 * s, "SICKRelatedness": 65 - s, "avg": 65 - 10 * s}
         for sc in ("align_uniform", "random") for s in (0.0, 0.1, 0.3)]
