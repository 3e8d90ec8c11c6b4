"""Fault injection for the reliability tests, installed as a training callback in the Ray workers
(SPARSECSE_CALLBACKS=faults:Faults, tests/ on PYTHONPATH); which faults fire is SPARSECSE_FAULT="kind:arg,…":

    stage1-kill:STEP   SIGKILL the rank-0 Ray Train worker once, at the first report after the checkpoint at STEP
    stage1-slow:SECS   stage 1's rank 0 sleeps SECS at every evaluation, before reporting it (so the previous report's
                       checkpoint stays the latest that long: time for a test to kill the driver mid-stage)
    trial-slow:SECS    every trial sleeps SECS at every report (time for a test to interrupt the trials mid-trial)
    trial-exit:TRIAL   that trial's process dies once, at its first report
    trial-nan:TRIAL    that trial's learning rate becomes 1e30, so its loss diverges
    trial-poor:TRIAL   that trial reports an STS-B dev of -100 (a clearly weak trial, for early-stopping tests)

"Once" is remembered in the run's storage (.faults/), so it holds when the retry lands on another node.
"""

from __future__ import annotations

import os
import signal
import time

from sparsecse.method.train import Callback

ENV = {"SPARSECSE_CALLBACKS": "faults:Faults"}


def env(fault: str, base: dict | None = None) -> dict:
    """The environment variables that make a sweep's workers load these faults and fire `fault` (on top of `base`,
    default os.environ): the callback, the fault spec and tests/ on PYTHONPATH."""
    base = os.environ if base is None else base
    path = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)), base.get("PYTHONPATH")]))
    return {**ENV, "SPARSECSE_FAULT": fault, "PYTHONPATH": path}


def spec() -> dict[str, str]:
    out = {}
    for item in filter(None, os.environ.get("SPARSECSE_FAULT", "").split(",")):
        kind, _, arg = item.partition(":")
        out[kind] = arg
    return out


class Faults(Callback):
    def __init__(self, where: str, rank: int, store):
        self.where, self.rank, self.store, self.spec = where, rank, store, spec()

    def _once(self, marker: str) -> bool:
        if self.store.exists(f".faults/{marker}"):
            return False
        self.store.write_text(f".faults/{marker}", "fired\n")
        return True

    def on_train_start(self, model, optimizer) -> None:
        if self.spec.get("trial-nan") == self.where:
            for g in optimizer.param_groups:  # the first step throws every weight to ~1e30: the loss diverges
                g["lr"] = 1e30

    def on_report(self, metrics: dict, checkpoint) -> None:
        if self.spec.get("trial-poor") == self.where:
            metrics["stsb_dev"] = metrics["best_stsb_dev"] = -100.0
        if self.where == "stage1" and self.rank == 0 and self.spec.get("stage1-slow"):
            time.sleep(float(self.spec["stage1-slow"]))
        if self.where != "stage1" and self.spec.get("trial-slow"):
            time.sleep(float(self.spec["trial-slow"]))
        kill_at = self.spec.get("stage1-kill")
        if (self.where == "stage1" and kill_at and self.rank == 0 and metrics["step"] > int(kill_at)
                and self._once("stage1-killed")):
            time.sleep(5)  # Ray Train's controller registers reports by polling: let it see the last one
            os.kill(os.getpid(), signal.SIGKILL)
        if self.spec.get("trial-exit") == self.where and self._once(f"trial-exit-{self.where}"):
            os.kill(os.getpid(), signal.SIGKILL)  # the trial process is killed mid-trial
