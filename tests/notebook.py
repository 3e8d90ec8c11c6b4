"""A notebook's view of Ctrl-C, for tests/test_faults.py: one Python process calls `run_sweep` (as a notebook cell
would), is interrupted by its own SIGINT (what Jupyter's interrupt sends the kernel) at each stage, catches
Interrupted and looks at what is left in the process, then resumes in the same process to the end — without the
faults (tests/faults.py) that slowed the interrupted drivers down.

    python tests/notebook.py CONFIG RUN DATA_DIR LOG RESULT > LOG 2>&1

LOG is where this process's own output goes (the scoring stage is recognised by the driver's line there). RESULT
gets one JSON object: per stage {"stage", "interrupted", "message", "stopped_s", "ray_connected", "calls_in_flight",
"ray_gone_s"}, then "final" (the resumed sweep's selected point, or its error).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray

from benchmarks import interrupt
from sparsecse import Interrupted
from sparsecse.core.storage import Storage
from sparsecse.run import ray_adapter as ra
from sparsecse.run.sweep import run_sweep


def interrupt_when(ready, store: Storage, log: Path, hit: dict) -> threading.Thread:
    """A thread that sends this process SIGINT once `ready(store, log)` (the time it did so in hit["t"])."""
    def watch() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not ready(store, log):
            time.sleep(0.2)
        hit["t"] = time.time()
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def main(config: str, run: str, data_dir: str, log: str) -> dict:
    store, rows = Storage(run), []
    for i, (what, ready) in enumerate(interrupt.STAGES):
        hit: dict = {}
        watcher = interrupt_when(ready, store, Path(log), hit)
        row = {"stage": what, "interrupted": False}
        try:
            run_sweep(config, out=run, data_dir=data_dir, resume=bool(i))
        except Interrupted as e:
            row.update(interrupted=True, message=str(e), stopped_s=round(time.time() - hit["t"], 2))
        watcher.join(timeout=1)
        row.update(ray_connected=ray.is_initialized(), calls_in_flight=ra.calls_in_flight(),
                   ray_gone_s=interrupt.ray_gone_within(os.environ["RAY_TMPDIR"], 20.0))
        rows.append(row)
        print(f"[notebook] {row}", flush=True)
    os.environ.pop("SPARSECSE_FAULT", None)  # the next local Ray's workers start without it
    try:
        summary = run_sweep(config, out=run, data_dir=data_dir, resume=True)
        final = {"selected": summary.get("selected")}
    except Exception as e:  # noqa: BLE001 - reported to the test
        final = {"error": f"{type(e).__name__}: {e}"}
    return {"interrupts": rows, "final": final}


if __name__ == "__main__":
    Path(sys.argv[5]).write_text(json.dumps(main(*sys.argv[1:5])))
