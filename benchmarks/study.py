"""`python -m benchmarks.study LABELFREE_RUN[,RUN…] LABELLED_RUN[,RUN…]`: the analysis docs/study.md pre-registers,
applied to the finished sweeps' results.json (local paths, storage URIs, or results JSON files; several runs of one
scoring, such as one run per replicate, comma-separated). It prints the BENCHMARKS row (markdown) and writes
the figures as JSON beside (bench-results/study.json).

Unit: the stage-1 replicate (each run has one retraining seed per replicate). Outcome: test/avg, the mean Spearman
× 100 over the seven STS test tasks. Controls at equal budget (s = 0, random, magnitude) are the same computation in
both runs (they do not read the scores), so the labelled run's paper points are paired with the label-free run's
controls, by replicate.

    H1  non-inferiority to the s = 0 control, margin 0.5, one-sided paired t over replicates, at 2 % and 10 %;
        Holm over those two
    H2  the paper's score vs random at the same sparsity and normalize reading, two-sided paired t, every sparsity
    H3  the paper's score vs the s = 0 control, two-sided paired t, every sparsity
        H2 and H3 are one family of ten tests, Holm-adjusted
Each family is computed for the primary cell (label-free scoring, the paper's reading gradient/none) and, as
secondary cells with their own families, StarK's reading (score/layer) and labelled scoring. Sensitivity: the same
tests exact (sign-flip), whose floors at n = 5 (0.0625 two-sided, 0.031 one-sided) are stated beside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparsecse.stats import correct_family, holm, noninferior, paired

MARGIN = 0.5
H1_SPARSITIES = (0.02, 0.1)
READINGS = {"paper": ("gradient", "none"), "stark": ("score", "layer")}
METRIC = "test/avg"


def _load(uris: str) -> list[dict]:
    """The trials of one or more runs (comma-separated): run directories or storage URIs holding results.json, or
    a results JSON file itself (the per-replicate runs' copies kept in docs/study-results/)."""
    from sparsecse.storage import Storage

    trials = []
    for uri in filter(None, uris.split(",")):
        if uri.endswith(".json"):
            trials += json.loads(Path(uri).read_text())["trials"]
        else:
            trials += Storage(uri).read_json("results.json")["trials"]
    return trials


def by_replicate(trials: list[dict], **match) -> dict[int, float]:
    """{replicate: METRIC} of the finished trials matching every field given (seeds within a replicate
    averaged)."""
    vals: dict[int, list[float]] = {}
    for t in trials:
        if t["status"] == "done" and all(t.get(k) == v for k, v in match.items()):
            vals.setdefault(replicate_of(t), []).append(t[METRIC])
    return {r: sum(v) / len(v) for r, v in vals.items()}


def replicate_of(t: dict) -> int:
    """A trial's stage-1 replicate, the same in both layouts of the study: one run of five replicates (replicate
    r, seed 1), or one run per replicate (replicate 0, seed 1 + 1000 r, the seeds replicate r of the five-replicate
    run retrains with; docs/study.md, Deviations)."""
    name = t.get("trial", "")
    rep = t.get("replicate") or (int(name.rsplit("_rep", 1)[1]) if "_rep" in name else 0)
    return int(rep) + int(t.get("seed") or 0) // 1000


def cell(paper_trials: list[dict], control_trials: list[dict], reading: tuple[str, str],
         sparsities: list[float], exact: bool = False) -> dict:
    """H1–H3 of one cell: the paper's score under `reading` (from paper_trials) against the controls (from
    control_trials), with their families Holm-adjusted."""
    below = 10 if exact else 0  # exact: the sign-flip test at n < 10; else the t-test
    combine, normalize = reading
    ctrl = by_replicate(control_trials, sparsity=0.0)
    rows, h1 = [], []
    for s in sparsities:
        ours = by_replicate(paper_trials, sparsity=s, scorer="align_uniform", combine=combine, normalize=normalize)
        rand = by_replicate(control_trials, sparsity=s, scorer="random", normalize=normalize)
        mag = by_replicate(control_trials, sparsity=s, scorer="magnitude", normalize=normalize)
        row = {"sparsity": s, "n": len(ours), "mean": _mean(ours), "random": _mean(rand), "magnitude": _mean(mag),
               "control": _mean(ctrl), "H2": paired(ours, rand, below), "H3": paired(ours, ctrl, below)}
        if s in H1_SPARSITIES:
            row["H1"] = noninferior(ours, ctrl, MARGIN, below)
            h1.append(row["H1"])
        rows.append(row)
    for t, p in zip(h1, holm([t["p"] for t in h1])):
        t["p_raw"], t["p"], t["passed"] = t["p"], p, p is not None and p < 0.05
    correct_family([r[h] for r in rows for h in ("H2", "H3")])
    return {"reading": f"{combine}/{normalize}", "rows": rows}


def _mean(d: dict) -> float | None:
    return sum(d.values()) / len(d) if d else None


def analyse(labelfree: list[dict], labelled: list[dict], sparsities: list[float]) -> dict:
    out = {}
    for exact in (False, True):
        key = "exact" if exact else "t"
        out[key] = {"primary": cell(labelfree, labelfree, READINGS["paper"], sparsities, exact),
                    "stark": cell(labelfree, labelfree, READINGS["stark"], sparsities, exact),
                    "labelled": cell(labelled, labelfree, READINGS["paper"], sparsities, exact),
                    "labelled_stark": cell(labelled, labelfree, READINGS["stark"], sparsities, exact)}
    return out


def _fmt(t: dict | None) -> str:
    if not t or t.get("diff") is None:
        return "—"
    p = "" if t.get("p") is None else f", p = {t.get('p_raw', t['p']):.3f}, Holm {t['p']:.3f}"
    verdict = t.get("verdict") or ("non-inferior" if t.get("passed") else "not shown")
    return f"{t['diff']:+.2f} (n = {t['n']}{p}: {verdict})"


def markdown(result: dict) -> str:
    lines = []
    for name, c in result["t"].items():
        lines += [f"**{name}** (reading {c['reading']}; paired t over replicates, Holm per family)", "",
                  "| sparsity | n | paper | random | magnitude | control | H1: ≥ control − 0.5 | H2: vs random | "
                  "H3: vs control |", "|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for r in c["rows"]:
            f = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
            lines.append(f"| {r['sparsity']:.0%} | {r['n']} | {f(r['mean'])} | {f(r['random'])} | "
                         f"{f(r['magnitude'])} | {f(r['control'])} | {_fmt(r.get('H1'))} | {_fmt(r['H2'])} | "
                         f"{_fmt(r['H3'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.splitlines()[0])
    ap.add_argument("labelfree")
    ap.add_argument("labelled")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.3])
    ap.add_argument("--out", default="bench-results/study.json")
    a = ap.parse_args(argv)
    result = analyse(_load(a.labelfree), _load(a.labelled), a.sparsities)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
