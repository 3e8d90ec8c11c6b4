"""`sparsecse show RUN`: a run's answer again — the choice, its evidence, where the model is and how to load it —
from a finished run's summary.json, or how far a live (or interrupted) one has come; `--trials` adds the trial
table, `--json` prints the summary as it is stored. Also the block the sweep prints when it finishes."""

from __future__ import annotations

import json
import re

from .. import SparseCSEError
from ..core.results import DEV, metric_key
from ..core.storage import Storage, open_storage
from ..core.tables import label, render
from .rundir import SWEEP_FILE, reported_trials


def closing_block(summary: dict) -> list[str]:
    """The answer in plain text (the report's first paragraph), where the report and the model are, and the two
    lines that load the model."""
    out = [re.sub(r"\*\*|`", "", summary.get("answer") or "No answer recorded (a run from before answers were kept); "
                                                         "see its report.")]
    out.append(f"report: {summary.get('report') or 'report.html in the run'}")
    export = summary.get("export")
    if not export:
        return out
    if (summary.get("selected") or {}).get("control_won"):  # nothing pruned: the plain model, no custom code
        model, what, kwargs = export, f"the unpruned control: nothing was removed; {export}/pruned holds the same", ""
    else:
        model, what, kwargs = f"{export}/pruned", f"physically pruned; dense copy: {export}", ", trust_remote_code=True"
    return out + [f"model:  {model} ({what})", "load:   from sentence_transformers import SentenceTransformer",
                  f"        model = SentenceTransformer(\"{model}\"{kwargs})"]


def _trial_table(results: dict) -> str:
    rows = results.get("trials") or []
    avg = metric_key("test", "avg")
    return render(["trial", "status", "sparsity", "λ", "seed", "choice", DEV, label("avg")],
                  [[t["trial"], t["status"], f"{t['sparsity']:.0%}", t["lam"], t["seed"],
                    t.get(metric_key("choice", "all")), t.get(DEV), t.get(avg)] for t in rows], left=2)


def show(uri: str, trials: bool = False, as_json: bool = False, timeout_s: float = 60.0) -> str:
    store = open_storage(uri, timeout_s, flag="RUN")
    if store.is_file("summary.json"):
        summary = store.read_json("summary.json")
        if as_json:
            return json.dumps(summary, indent=1, sort_keys=True)
        lines = closing_block({**summary, "report": summary.get("report") or store.url("report.html")})
        if trials and store.is_file("results.json"):
            lines += ["", _trial_table(store.read_json("results.json"))]
        return "\n".join(lines)
    if not store.is_file(SWEEP_FILE):
        raise SparseCSEError(f"RUN {store.uri}: holds no sweep ({SWEEP_FILE} missing); pass a sweep's --out")
    return "\n".join(_progress(store, as_json))


def _progress(store: Storage, as_json: bool) -> list[str]:
    """A run without a summary: running, or stopped before the end (resume it with --resume)."""
    state = store.read_json(SWEEP_FILE)
    reported = reported_trials(store)
    done = {"stage 1": bool(state.get("train_fp")), "scoring": bool(state.get("score_fp")),
            "trials reporting": len(reported)}
    if as_json:
        return [json.dumps({"finished": False, **done}, sort_keys=True)]
    return [f"{store.uri}: not finished (running, or stopped: resume with `sparsecse sweep CONFIG --out {store.uri} "
            f"--resume`) — stage 1 {'done' if done['stage 1'] else 'not done'}, scoring "
            f"{'done' if done['scoring'] else 'not done'}, {len(reported)} trial(s) reporting; live report: "
            f"{store.url('report.html')}"]
