"""Ctrl-C at every stage of a real sweep, then `--resume` to the end (issue 37's check on the quickstart).

    python -m benchmarks.interrupt sweeps/quickstart.yaml --out runs/ctrl-c --data-dir DIR [--reference RUN]

What a terminal's Ctrl-C does — SIGINT to the whole foreground process group — is sent three times, each to a
fresh `sparsecse sweep` (the first new, the others `--resume`): once stage 1 has written a checkpoint, once the
driver has handed scoring to Ray, and once a trial has reported. Each time it records the exit code, how long the
driver took to exit, its last line and whether anything claiming the sweep finished was written (summary.json,
report.md). Then `--resume` runs to the end, and its choice is compared with an uninterrupted sweep of the same
config: `--reference RUN` (a finished run), else one this script runs into OUT-reference. Everything lands in
OUT/interrupt.json; the table is printed. tests/test_faults.py runs the same function on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.bench import machine
from benchmarks.gpu_sweep import ray_processes, stop_ray
from sparsecse.core.storage import Storage
from sparsecse.run.rundir import reported_trials


def _stage1_checkpointed(run: Storage, log: Path) -> bool:  # Ray Train's snapshot lists one: what a restart restores
    snap = "stage1/checkpoint_manager_snapshot.json"
    return run.is_file(snap) and bool(json.loads(run.read_bytes(snap)).get("latest_checkpoint_result"))


def _scoring(run: Storage, log: Path) -> bool:  # a new Ray worker then imports torch: seconds before scores exist
    return log.is_file() and "scoring every head and neuron" in log.read_text()


def _trial_reported(run: Storage, log: Path) -> bool:
    return bool(reported_trials(run))


STAGES: tuple[tuple[str, Callable[[Storage, Path], bool]], ...] = (
    ("stage 1", _stage1_checkpointed), ("scoring", _scoring), ("the trials", _trial_reported))


def kill_ray(ray_tmp: Path) -> None:
    """This sweep's own local Ray (every process naming `ray_tmp`) killed, its folder removed."""
    stop_ray(str(ray_tmp))
    shutil.rmtree(ray_tmp, ignore_errors=True)


def start_sweep(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "sparsecse", "sweep", *argv], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(what: str, proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.2)
    if proc.poll() is not None:
        raise RuntimeError(f"the sweep ended (exit {proc.returncode}) before {what}")
    if not ready():
        raise RuntimeError(f"no {what} within {timeout_s:.0f} s")


def sweep_env(ray_tmp: Path, env: dict | None = None) -> dict:
    """A sweep's environment with its own local Ray in `ray_tmp` (short: socket paths) and no dashboard."""
    out = {**os.environ, "SPARSECSE_DASHBOARD": "0", **(env or {}), "RAY_TMPDIR": str(ray_tmp)}
    out.pop("RAY_ADDRESS", None)
    return out


def ray_gone_within(marker: str, timeout_s: float) -> float | None:
    """Seconds until no process of the sweep's local Ray (`marker`: its temp dir) is left, None if some outlive
    `timeout_s`: an interrupted driver must not leave its Ray behind."""
    t0 = time.time()
    while ray_processes(marker):
        if time.time() - t0 > timeout_s:
            return None
        time.sleep(0.2)
    return round(time.time() - t0, 2)


def claims_finished(run: Storage, out: str) -> bool:
    return any(run.exists(f) for f in ("summary.json", "report.md")) or "[sweep] done" in out


def interrupt_each_stage(config: Path, run: str, data_dir: Path, logs: Path, env: dict | None = None,
                         timeout_s: float = 1800, to_the_end: bool = True,
                         stages: tuple[tuple[str, Callable[[Storage, Path], bool]], ...] = STAGES) -> dict:
    """The three interrupts (`run`: a folder or a storage URI) and, with `to_the_end`, the resume to the end;
    {"interrupts": [row per stage], "final": {...}}."""
    ray_tmp = Path("/tmp") / f"scse-int-{os.getpid()}"
    env = sweep_env(ray_tmp, env)
    argv = [str(config), "--out", str(run), "--data-dir", str(data_dir)]
    store = Storage(run)
    logs.mkdir(parents=True, exist_ok=True)
    rows, final = [], {}
    try:
        for i, (what, ready) in enumerate(stages):
            log = logs / f"interrupt-{i + 1}.log"
            proc = start_sweep(argv + (["--resume"] if i else []), env, log)
            try:
                wait_for(what, proc, lambda: ready(store, log), timeout_s)
                t0 = time.time()
                os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
                rc = proc.wait(timeout=60)
                took = time.time() - t0
                gone = ray_gone_within(str(ray_tmp), 20.0)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                kill_ray(ray_tmp)
            out = log.read_text()
            rows.append({"stage": what, "rc": rc, "exit_s": round(took, 2), "ray_gone_s": gone, "log": str(log),
                         "last_line": (out.strip().splitlines() or [""])[-1],
                         "claims_finished": claims_finished(store, out)})
        if to_the_end:
            final = resume_to_end(argv, env, logs / "resumed.log", store, timeout_s)
    finally:
        kill_ray(ray_tmp)
    return {"interrupts": rows, "final": final}


def resume_to_end(argv: list[str], env: dict, log: Path, store: Storage, timeout_s: float) -> dict:
    """`sweep ... --resume` to its end: {"rc", "wall_s", "log"} and, when it finished, the "selected" point."""
    t0 = time.time()
    proc = start_sweep(argv + ["--resume"], env, log)
    try:
        rc = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    final = {"rc": rc, "wall_s": round(time.time() - t0, 1), "log": str(log)}
    if rc == 0:
        final["selected"] = store.read_json("summary.json")["selected"]
    return final


def _choice(selected: dict) -> dict:
    return {k: selected.get(k) for k in ("method", "sparsity", "lam", "dev_mean")}


def same_choice(a: dict | None, b: dict | None) -> bool:
    """The same point chosen with the same dev figure (to 1e-6: the resumed run's floats went through storage)."""
    if not a or not b:
        return False
    a, b = _choice(a), _choice(b)
    dev = a.pop("dev_mean"), b.pop("dev_mean")
    return a == b and None not in dev and abs(dev[0] - dev[1]) <= 1e-6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.interrupt", description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the interrupted run's folder (new)")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("SPARSECSE_DATA_DIR"))
    p.add_argument("--reference", type=Path, help="a finished uninterrupted run of the same config")
    a = p.parse_args(argv)
    t0 = time.time()
    res = interrupt_each_stage(a.config, a.out, a.data_dir, a.out.parent / f"{a.out.name}-logs")
    ref = a.reference
    if ref is None:  # the uninterrupted peer, run here
        ref = a.out.parent / f"{a.out.name}-reference"
        r = subprocess.run([sys.executable, "-m", "sparsecse", "sweep", str(a.config), "--out", str(ref),
                            "--data-dir", str(a.data_dir)], capture_output=True, text=True,
                           env={**os.environ, "SPARSECSE_DASHBOARD": "0"})
        if r.returncode != 0:
            print(r.stdout[-2000:] + r.stderr[-2000:], file=sys.stderr)
            return 1
    res["reference"] = {"run": str(ref), "selected": _choice(json.loads((ref / "summary.json").read_text())["selected"])}
    res["same_choice"] = same_choice(res["final"].get("selected"), res["reference"]["selected"])
    res.update(machine=machine(), config=str(a.config), wall_s=round(time.time() - t0, 1))
    (a.out.parent / f"{a.out.name}-logs" / "interrupt.json").write_text(json.dumps(res, indent=2) + "\n")
    print("| Ctrl-C during | exit | driver exited after | its Ray gone after | claims finished | last line |\n"
          "|---|---|---|---|---|---|")
    for r in res["interrupts"]:
        gone = "still running" if r["ray_gone_s"] is None else f"{r['ray_gone_s']:.1f} s"
        print(f"| {r['stage']} | {r['rc']} | {r['exit_s']:.1f} s | {gone} | {'yes' if r['claims_finished'] else 'no'} "
              f"| {r['last_line'][:90]} |")
    print(f"\n--resume to the end: exit {res['final']['rc']} in {res['final']['wall_s']:.0f} s; choice "
          f"{_choice(res['final'].get('selected') or {})} vs uninterrupted {res['reference']['selected']}: "
          f"{'same' if res['same_choice'] else 'DIFFERENT'}")
    ok = all(r["rc"] == 130 and r["ray_gone_s"] is not None and not r["claims_finished"]
             for r in res["interrupts"]) and res["same_choice"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
