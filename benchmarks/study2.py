"""The pre-registered analysis of study 2 (docs/study2.md): does the default selection's choice hold on the test sets
no choice touched? Reads each replicate's results.json (docs/study2-results/rep<r>.json) and prints the tables for
BENCHMARKS.md; `--json PATH` also writes them (temp file, then rename).

    python -m benchmarks.study2 docs/study2-results [--json bench-results/study2.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats as st

from sparsecse.core.io import atomic_write_json
from sparsecse.core.results import metric_key

MARGIN = 0.5
SICK, AVG = metric_key("test", "SICKRelatedness"), metric_key("test", "avg")
CHOICE_ALL = metric_key("choice", "all")
RULES = ("safe", "noninferior", "best_dev")  # the default first


def load(folder: Path) -> dict[int, dict]:
    """{replicate: its results.json}, from rep<r>.json files."""
    runs = {int(p.stem[3:]): json.loads(p.read_text()) for p in sorted(Path(folder).glob("rep*.json"))}
    if not runs:
        raise SystemExit(f"{folder}: no rep<r>.json files")
    return runs


def _controls(run: dict) -> list[dict]:
    return [t for t in run["trials"] if t["sparsity"] == 0 and t["status"] == "done"]


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([t[key] for t in rows]))


def delta(run: dict, trial: str, key: str) -> float:
    """A trial's `key` minus the mean over the control's retrainings."""
    row = next(t for t in run["trials"] if t["trial"] == trial)
    return row[key] - _mean(_controls(run), key)


def interval(xs: list[float]) -> dict:
    """Mean and 95 % t interval (None for fewer than two values)."""
    m = float(np.mean(xs))
    if len(xs) < 2:
        return {"mean": m, "lo": None, "hi": None, "n": len(xs)}
    h = st.t.ppf(0.975, len(xs) - 1) * np.std(xs, ddof=1) / math.sqrt(len(xs))
    return {"mean": m, "lo": m - h, "hi": m + h, "n": len(xs)}


def choices(runs: dict[int, dict]) -> list[dict]:
    """Per replicate and rule: the chosen sparsity and trial, its Δ on SICK-R and the 7-task average, within?"""
    out = []
    for r, run in sorted(runs.items()):
        picks = {**(run.get("rules") or {}), "safe": {"sparsity": run["selected"]["sparsity"],
                                                      "trial": run["selected"]["trial"]}}
        for rule in RULES:
            c = picks.get(rule)
            if c is None:
                continue
            ds, da = delta(run, c["trial"], SICK), delta(run, c["trial"], AVG)
            out.append({"replicate": r, "rule": rule, "sparsity": c["sparsity"], "trial": c["trial"],
                        "d_sick": ds, "d_avg": da, "within": ds >= -MARGIN and da >= -MARGIN,
                        "why": (run["selected"].get("rule_detail") or {}).get("why") if rule == "safe" else None})
    return out


def per_sparsity(runs: dict[int, dict]) -> list[dict]:
    """Every pruned point's Δs over the replicates (mean, 95 % t interval), choice-half differences per source."""
    sparsities = sorted({t["sparsity"] for run in runs.values() for t in run["trials"] if t["sparsity"] > 0})
    out = []
    for s in sparsities:
        rows = [(run, t) for run in runs.values() for t in run["trials"] if t["sparsity"] == s and t["status"] == "done"]
        keys = [k for k in rows[0][1] if k.startswith(metric_key("choice", ""))] if rows else []
        out.append({"sparsity": s, "d_sick": interval([delta(run, t["trial"], SICK) for run, t in rows]),
                    "d_avg": interval([delta(run, t["trial"], AVG) for run, t in rows]),
                    **{k: interval([delta(run, t["trial"], k) for run, t in rows]) for k in keys}})
    return out


def tracking(runs: dict[int, dict]) -> dict:
    """Spearman's ρ between the choice-half difference (all sources) and the SICK-R test Δ over the pruned trials."""
    pairs = [(delta(run, t["trial"], CHOICE_ALL), delta(run, t["trial"], SICK)) for run in runs.values()
             for t in run["trials"] if t["sparsity"] > 0 and t["status"] == "done" and t.get(CHOICE_ALL) is not None]
    rho = float(st.spearmanr(*zip(*pairs)).correlation) if len(pairs) > 2 else None
    return {"rho": rho, "n": len(pairs)}


def noise(runs: dict[int, dict]) -> dict:
    """The control retrainings' sample SD per replicate, averaged, on SICK-R and the 7-task average."""
    return {k: float(np.mean([np.std([t[k] for t in _controls(run)], ddof=1) for run in runs.values()]))
            for k in (SICK, AVG)}


def refusals(runs: dict[int, dict]) -> dict[int, str]:
    """Added after the study (descriptive, not part of the pre-registered analysis): why the safe rule's sequence
    stopped in each replicate, per source — worse than the margin, or not shown and what would show a point that
    close (select.py's diagnosis, recomputed from the step each results.json recorded)."""
    from sparsecse.study.select import why_stopped
    from sparsecse.study.stats import what_it_would_take

    out = {}
    for r, run in runs.items():
        steps = (run["selected"].get("rule_detail") or {}).get("steps") or []
        for step in steps:
            for t in step["sources"].values():
                t.update({"verdict": "passed"} if t["passed"] else what_it_would_take(t, MARGIN))
        if steps and not steps[-1]["passed"]:
            out[r] = why_stopped(steps).removeprefix("; ")
    return out


def analyse(runs: dict[int, dict]) -> dict:
    picks = choices(runs)
    default = [c for c in picks if c["rule"] == "safe"]
    held = sum(c["within"] for c in default)
    return {"replicates": len(runs), "H": {"within": held, "of": len(default), "holds": held >= 4},
            "pruned": sum(c["sparsity"] > 0 for c in default), "choices": picks, "per_sparsity": per_sparsity(runs),
            "tracking": tracking(runs), "control_sd": noise(runs), "refusals": refusals(runs)}


def _ci(x: dict) -> str:
    return f"{x['mean']:+.2f}" + ("" if x["lo"] is None else f" [{x['lo']:+.2f}, {x['hi']:+.2f}]")


def render(res: dict) -> str:
    h = res["H"]
    lines = [f"H (default within {MARGIN} of the control on SICK-R test and the 7-task average in ≥ 4 of 5): "
             f"{h['within']} of {h['of']} — {'holds' if h['holds'] else 'does not hold'}; the default pruned in "
             f"{res['pruned']} of {h['of']}.", "",
             "| replicate | rule | choice | Δ SICK-R | Δ 7-task avg | within |", "|---|---|---|---:|---:|---|"]
    for c in res["choices"]:
        pick = "control" if c["sparsity"] == 0 else f"{c['sparsity']:.0%}"
        lines.append(f"| {c['replicate']} | {c['rule']} | {pick} | {c['d_sick']:+.2f} | {c['d_avg']:+.2f} | "
                     f"{'yes' if c['within'] else 'no'} |")
    keys = [k for k in res["per_sparsity"][0] if k.startswith("choice/")] if res["per_sparsity"] else []
    lines += ["", "| sparsity | Δ SICK-R [95 % t] | Δ 7-task avg | " + " | ".join(f"Δ {k}" for k in keys) + " |",
              "|---|---:|---:|" + "---:|" * len(keys)]
    for p in res["per_sparsity"]:
        lines.append(f"| {p['sparsity']:.0%} | {_ci(p['d_sick'])} | {_ci(p['d_avg'])} | "
                     + " | ".join(_ci(p[k]) for k in keys) + " |")
    t, sd = res["tracking"], res["control_sd"]
    lines += ["", f"ρ(Δ choice half, Δ SICK-R) over {t['n']} pruned trials: "
              + ("—" if t["rho"] is None else f"{t['rho']:+.2f}") + f"; control retrainings' SD: SICK-R "
              f"{sd[SICK]:.2f}, 7-task avg {sd[AVG]:.2f}."]
    if res.get("refusals"):
        lines += ["", "Why the default refused (added after the study, descriptive; 80 % power for a point as close "
                  "as each estimate):"] + [f"- replicate {r}: {why}" for r, why in sorted(res["refusals"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    res = analyse(load(a.folder))
    print(render(res))
    if a.json:
        atomic_write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
