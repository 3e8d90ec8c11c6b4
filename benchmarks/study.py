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

from sparsecse.core.io import atomic_write_text
from sparsecse.study.stats import correct_family, holm, noninferior, paired, sample_std

MARGIN = 0.5
H1_SPARSITIES = (0.02, 0.1)
READINGS = {"paper": ("gradient", "none"), "stark": ("score", "layer")}
METRIC = "test/avg"
LEAK_FREE = "test/SICKRelatedness"  # no pair shared with STS-B dev or the scoring data


def _runs(uris: str) -> list[dict]:
    """The results of one or more runs (comma-separated): run directories or storage URIs holding results.json, or
    a results JSON file itself (the per-replicate runs' copies kept in docs/study-results/)."""
    from sparsecse.core.storage import Storage

    runs = []
    for uri in filter(None, uris.split(",")):
        if uri.endswith(".json"):
            runs.append(json.loads(Path(uri).read_text()))
        else:
            runs.append(Storage(uri).read_json("results.json"))
    return runs


def _load(uris: str) -> list[dict]:
    """The trials of one or more runs (as `_runs` reads them), merged."""
    return _trials(_runs(uris))


def _trials(runs: list[dict]) -> list[dict]:
    return [t for run in runs for t in run["trials"]]


def by_replicate(trials: list[dict], metric: str = METRIC, **match) -> dict[int, float]:
    """{replicate: metric} of the finished trials matching every field given (seeds within a replicate
    averaged; a trial without that metric, such as one evaluated on other tasks, is left out)."""
    vals: dict[int, list[float]] = {}
    for t in trials:
        if t["status"] == "done" and t.get(metric) is not None and all(t.get(k) == v for k, v in match.items()):
            vals.setdefault(replicate_of(t), []).append(t[metric])
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
    out["leak_free"] = leak_free(labelfree, labelfree, READINGS["paper"], sparsities)
    out["leak_free_cells"] = {name: leak_free(paper, labelfree, READINGS[reading], sparsities)
                              for name, paper, reading in (("stark", labelfree, "stark"),
                                                           ("labelled", labelled, "paper"),
                                                           ("labelled_stark", labelled, "stark"))}
    ctrl = list(by_replicate(labelfree, sparsity=0.0).values())
    out["control_spread"] = {"sd": sample_std(ctrl), "range": (max(ctrl) - min(ctrl)) if ctrl else None}
    return out


def leak_free(paper_trials: list[dict], control_trials: list[dict], reading: tuple[str, str],
              sparsities: list[float]) -> list[dict]:
    """A cell (the paper's score under `reading`, against the s = 0 control) on SICK-R test alone, the one test
    task sharing no pair with STS-B dev or the scoring data (docs/study.md, Leakage): descriptive — the paired
    difference, its 95 % t interval over replicates and how many replicates are below the control; no test."""
    combine, normalize = reading
    ctrl = by_replicate(control_trials, LEAK_FREE, sparsity=0.0)
    rows = []
    for s in sparsities:
        ours = by_replicate(paper_trials, LEAK_FREE, sparsity=s, scorer="align_uniform", combine=combine,
                            normalize=normalize)
        t = paired(ours, ctrl, 0)
        rows.append({"sparsity": s, "n": t["n"], "mean": _mean(ours), "control": _mean(ctrl), "diff": t["diff"],
                     "lo": t.get("lo"), "hi": t.get("hi"),
                     "below": sum(ours[r] < ctrl[r] for r in ours if r in ctrl)})
    return rows


def summary(runs: list[dict], kind: str) -> list[dict]:
    """One row per run (a replicate's sweep): the rule its report selected with, what it selected and why, that
    model's test average beside the control's, the failed trials, and its transfer rows where it has them."""
    rows = []
    for run in runs:
        sel, ctrl = run.get("selected") or {}, run.get("control") or {}
        rep = min((replicate_of(t) for t in run["trials"]), default=None)
        chosen = "control (s = 0)" if sel.get("control_won") or not sel.get("sparsity") else \
            f"{sel.get('method')} {sel.get('combine')}/{sel.get('normalize')} at {sel['sparsity']:.0%}"
        rows.append({"kind": kind, "replicate": rep, "rule": sel.get("rule"), "chosen": chosen,
                     "why": (sel.get("rule_detail") or {}).get("why"), "test": (sel.get("test") or {}).get("avg"),
                     "control_test": (ctrl.get("test") or {}).get("avg"),
                     "failed": [f["trial"] for f in run.get("failed") or []],
                     "transfer": run.get("transfer") or {}})
    return rows


def _p(p: float) -> str:
    """A p value as printed: three decimals, "< 0.001" below that (never "0.000")."""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _fmt(t: dict | None) -> str:
    if not t or t.get("diff") is None:
        return "—"
    p = "" if t.get("p") is None else f", p {'= ' if t.get('p_raw', t['p']) >= 0.001 else ''}{_p(t.get('p_raw', t['p']))}, Holm {_p(t['p'])}"
    verdict = t.get("verdict") or ("non-inferior" if t.get("passed") else "not shown")
    return f"{_ci(t)} (n = {t['n']}{p}: {verdict})"


def _ci(t: dict) -> str:
    """A difference and, where it has one, its 95 % interval."""
    if t.get("diff") is None:
        return "—"
    return f"{t['diff']:+.2f}" + (f" [{t['lo']:+.2f}, {t['hi']:+.2f}]" if t.get("lo") is not None else "")


def markdown(result: dict) -> str:
    lines, f = [], lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    for name, c in result["t"].items():
        lines += [f"**{name}** (reading {c['reading']}; paired t over replicates, Holm per family)", "",
                  "| sparsity | n | paper | random | magnitude | control | H1: ≥ control − 0.5 | H2: vs random | "
                  "H3: vs control |", "|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for r in c["rows"]:
            lines.append(f"| {r['sparsity']:.0%} | {r['n']} | {f(r['mean'])} | {f(r['random'])} | "
                         f"{f(r['magnitude'])} | {f(r['control'])} | {_fmt(r.get('H1'))} | {_fmt(r['H2'])} | "
                         f"{_fmt(r['H3'])} |")
        lines.append("")
    lines += ["**Sensitivity, pre-registered: the same tests exact** (sign-flip over the 5 replicates; smallest "
              "attainable p 0.0625 two-sided, 0.031 one-sided, so nothing can pass Holm at n = 5)", "",
              "| cell | sparsity | H1 exact p (Holm) | H2 exact p (Holm) | H3 exact p (Holm) |", "|---|---:|---|---|---|"]
    ex = lambda t: "—" if not t or t.get("p") is None else f"{_p(t.get('p_raw', t['p']))} ({_p(t['p'])})"  # noqa
    for name, c in result.get("exact", {}).items():
        lines += [f"| {name} | {r['sparsity']:.0%} | {ex(r.get('H1'))} | {ex(r['H2'])} | {ex(r['H3'])} |"
                  for r in c["rows"]]
    lines.append("")
    cells = {"primary": result["leak_free"], **result.get("leak_free_cells", {})}
    lines += [f"**Leak-free** ({LEAK_FREE.split('/')[1]} test alone, each cell against the control; descriptive, 95 % "
              "t interval, no test)", "", "| cell | sparsity | n | paper | control | difference | replicates below |",
              "|---|---:|---:|---:|---:|---|---:|"]
    lines += [f"| {name} | {r['sparsity']:.0%} | {r['n']} | {f(r['mean'])} | {f(r['control'])} | {_ci(r)} | "
              f"{r.get('below', '—')} of {r['n']} |" for name, rows in cells.items() for r in rows]
    spread = result.get("control_spread")
    if spread and spread["sd"] is not None:
        lines.append(f"\nThe s = 0 control over the replicates: sample SD {spread['sd']:.2f} (range "
                     f"{spread['range']:.2f}).")
    lines.append("")
    for r in result.get("runs", []):
        lines.append(f"- {r['kind']} replicate {r['replicate']}: rule {r['rule']} chose {r['chosen']} — test "
                     f"{f(r['test'])} against the control's {f(r['control_test'])}"
                     + (f"; failed: {', '.join(r['failed'])}" if r["failed"] else "")
                     + ("; transfer avg " + ", ".join(f"{k} {f(v.get('avg'))}" for k, v in r["transfer"].items())
                        if r["transfer"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.splitlines()[0])
    ap.add_argument("labelfree")
    ap.add_argument("labelled")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.3])
    ap.add_argument("--out", default="bench-results/study.json")
    a = ap.parse_args(argv)
    free, lab = _runs(a.labelfree), _runs(a.labelled)
    result = analyse(_trials(free), _trials(lab), a.sparsities)
    result["runs"] = summary(free, "label-free") + summary(lab, "labelled")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1, default=str))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
