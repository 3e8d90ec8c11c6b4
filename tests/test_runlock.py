"""One driver per run (runlock.py): the lock's rules on a fake clock — a live driver refuses a second one, a
stopped one is taken over by --resume — and the sweep's use of it. Two real drivers on S3 meet in
tests/test_faults.py's interrupted fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsecse import SparseCSEError
from sparsecse.run.runlock import LOCK, RunLock
from sparsecse.core.storage import Storage


class Clock:
    def __init__(self):
        self.t = 1000.0
        self.on_sleep = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        for f in self.on_sleep:
            f(self.t)


def _lock(store, clock, stale=20.0) -> RunLock:
    return RunLock(store, stale, clock=clock, sleep=clock.sleep)


def test_a_live_driver_refuses_a_second_one_and_a_resume_that_sees_its_heartbeat(tmp_path):
    store, clock = Storage(tmp_path / "run"), Clock()
    first = _lock(store, clock)
    first.acquire(resume=False)
    try:
        with pytest.raises(SparseCSEError, match="another driver is running this sweep"):
            _lock(store, clock).acquire(resume=False)
        # --resume watches the heartbeat; the first driver beats again (simulated on the fake clock): refused
        clock.on_sleep.append(lambda t: first._write() if t > 1003 else None)
        with pytest.raises(SparseCSEError, match=r"another driver .*ray.lock_stale_s"):
            _lock(store, clock).acquire(resume=True)
    finally:
        first.release()
    assert not store.is_file(LOCK)  # released: a later driver finds no lock


def test_a_stopped_driver_is_taken_over_by_resume_once_its_heartbeat_is_stale(tmp_path, capsys):
    store, clock = Storage(tmp_path / "run"), Clock()
    store.write_text(LOCK, json.dumps({"owner": "dead", "host": "other-node", "pid": 7, "heartbeat": clock()}))
    second = _lock(store, clock, stale=20.0)
    second.acquire(resume=True)  # no heartbeat for 20 s of watching: taken over
    try:
        assert clock() >= 1020 and json.loads(store.read_bytes(LOCK))["owner"] == second.me["owner"]
        assert "taking over the run from a driver that stopped (host other-node" in capsys.readouterr().out
    finally:
        second.release()


def test_on_the_same_host_a_lock_whose_process_is_gone_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store, clock = Storage(tmp_path / "run"), Clock()
    store.write_text(LOCK, json.dumps({"owner": "x", "host": socket.gethostname(), "pid": int(dead.stdout),
                                       "heartbeat": clock()}))
    lock = _lock(store, clock, stale=600.0)
    lock.acquire(resume=True)
    assert clock() < 1002  # no waiting for staleness: its process is known dead
    lock.release()


def test_a_driver_that_loses_the_race_for_the_lock_steps_aside(tmp_path):
    store, clock = Storage(tmp_path / "run"), Clock()
    rival = {"owner": "rival", "host": "h", "pid": 1}
    # between our write and our read-back, another driver writes its own lock
    clock.on_sleep.append(lambda t: store.write_text(LOCK, json.dumps({**rival, "heartbeat": t})))
    with pytest.raises(SparseCSEError, match="another driver"):
        _lock(store, clock).acquire(resume=False)


def test_lock_stale_s_is_checked(tmp_path):
    from sparsecse.core.config import load_config

    with pytest.raises(SparseCSEError, match="ray.lock_stale_s"):
        load_config(None, ["ray.lock_stale_s=1"])


def test_a_new_sweep_into_a_run_another_driver_holds_names_that_driver(tmp_path, capsys):
    """`sparsecse sweep` without --resume on an --out whose lock is live: one line about the other driver, exit 2,
    nothing touched (not "already holds something else")."""
    import socket

    from sparsecse.cli import main
    from sparsecse.core.config import load_config  # noqa: F401 - the sweep's config loads before the lock is read

    run = tmp_path / "run"
    Storage(run).write_text(LOCK, json.dumps({"owner": "other", "host": socket.gethostname(), "pid": 1,
                                              "heartbeat": __import__("time").time()}))
    before = (run / LOCK).read_text()
    rc = main(["sweep", str(Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"), "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "another driver is running this sweep (host" in err[0]
    assert (run / LOCK).read_text() == before and sorted(p.name for p in run.iterdir()) == [LOCK]
