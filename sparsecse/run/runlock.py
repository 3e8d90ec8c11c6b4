"""One driver per run: `sparsecse sweep` holds a lock object in the run's storage (`driver.lock`: owner, host, pid,
heartbeat) for as long as it runs, so two drivers given the same --out never overwrite each other.

- A second driver finds the lock with a heartbeat newer than `ray.lock_stale_s`: a new sweep is refused at once; a
  `--resume` watches the heartbeat for up to that long and is refused (exit 2, one line) as soon as it advances —
  the owner is alive.
- A lock whose heartbeat stops for `ray.lock_stale_s` (a driver killed, a preempted pod) is taken over by
  `--resume`; on the same host a lock whose process is gone is taken over at once.
- Object stores have no create-if-absent here, so taking the lock is write-then-read-back: of two drivers that
  write it at the same moment, the one that does not read its own owner back steps aside.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import Callable

from .. import SparseCSEError

LOCK = "driver.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    def __init__(self, store, stale_s: float, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep):
        self.store, self.stale_s, self.clock, self.sleep = store, stale_s, clock, sleep
        self.me = {"owner": secrets.token_hex(8), "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def every_s(self) -> float:
        """How often the heartbeat is written: a quarter of the staleness limit, at most every 30 s."""
        return min(30.0, self.stale_s / 4)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(LOCK)) if self.store.is_file(LOCK) else None
        except (ValueError, SparseCSEError):  # half-written by a dying driver: as good as stale
            return {"owner": "?", "host": "?", "pid": -1, "heartbeat": 0.0}

    def _write(self) -> None:
        self.store.write_text(LOCK, json.dumps({**self.me, "heartbeat": self.clock()}) + "\n")

    def _busy(self, held: dict) -> str:
        return (f"--out {self.store.uri}: another driver is running this sweep (host {held['host']}, pid "
                f"{held['pid']}, heartbeat {self.clock() - held['heartbeat']:.0f} s ago); wait for it to finish, or if "
                f"it died, rerun with --resume once its heartbeat is {self.stale_s:g} s old (ray.lock_stale_s)")

    def _gone(self, held: dict) -> bool:
        """The holder is known dead: its heartbeat is stale, or it ran on this host and its process is gone."""
        if self.clock() - held["heartbeat"] >= self.stale_s:
            return True
        return held["host"] == self.me["host"] and held["pid"] != self.me["pid"] and not _pid_alive(held["pid"])

    def refuse_if_held(self) -> None:
        """One line when another live driver holds the run (before a new sweep looks at what --out holds)."""
        held = self._read()
        if held is not None and held.get("owner") != self.me["owner"] and not self._gone(held):
            raise SparseCSEError(self._busy(held))

    def check_resume(self) -> str | None:
        """What `--resume` would find, without taking the lock (`sweep --check --resume`): refused in one line when a
        live driver holds the run — its heartbeat moves within one beat, watched here — else None, or a note that
        the resume would first wait for a stopped driver's lock to go stale."""
        held = self._read()
        if held is None or self._gone(held):
            return None
        deadline = min(self.clock() + self.every_s + 1.0, held["heartbeat"] + self.stale_s)
        while self.clock() < deadline:
            self.sleep(min(1.0, self.every_s))
            now = self._read()
            if now is None:
                return None
            if now["heartbeat"] != held["heartbeat"] or now["owner"] != held["owner"]:
                raise SparseCSEError(self._busy(now))
        wait = held["heartbeat"] + self.stale_s - self.clock()
        return (f"its lock (host {held['host']}, pid {held['pid']}) stopped beating; --resume takes it over in "
                f"{max(0.0, wait):.0f} s") if wait > 0 else None

    def acquire(self, resume: bool) -> None:
        held = self._read()
        if held is not None and not self._gone(held):
            if not resume:
                raise SparseCSEError(self._busy(held))
            # a restarted driver may find its predecessor's lock still fresh: watch it until it is stale, and refuse
            # as soon as its heartbeat moves (its owner is alive)
            deadline = held["heartbeat"] + self.stale_s
            while self.clock() < deadline:
                self.sleep(min(1.0, self.every_s))
                now = self._read()
                if now is None:
                    break
                if now["heartbeat"] != held["heartbeat"] or now["owner"] != held["owner"]:
                    raise SparseCSEError(self._busy(now))
        if held is not None and held.get("owner") not in (None, "?"):
            print(f"[sweep] taking over the run from a driver that stopped (host {held['host']}, pid {held['pid']})")
        self._write()
        self.sleep(min(1.0, self.every_s))
        if (self._read() or {}).get("owner") != self.me["owner"]:
            raise SparseCSEError(self._busy(self._read() or {**self.me, "heartbeat": self.clock()}))
        self._thread = threading.Thread(target=self._beat, name="sparsecse-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                held = self._read()
                if held is None:  # deleted: this driver's own clean-up (a refused new sweep), or by hand
                    return
                if held.get("owner") != self.me["owner"]:
                    # taken over (this driver was thought dead): stop writing the lock, and say so
                    print(f"[sweep] WARNING: another driver took over {self.store.uri}; this one no longer holds it")
                    return
                self._write()
            except Exception:  # noqa: BLE001 - storage paused: the next beat tries again
                continue

    def release(self) -> None:
        """Stop the heartbeat (waiting for a beat in flight) and delete the lock if it is still ours; twice is fine."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            held = self._read()
            if held is not None and held.get("owner") == self.me["owner"]:
                self.store.delete(LOCK)
        except Exception:  # noqa: BLE001 - storage unreachable at exit: the lock goes stale on its own
            pass
