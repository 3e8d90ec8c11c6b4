"""What a training run puts in the run's storage, and when: a checkpoint policy whose bytes do not grow with the
number of evaluations (train.checkpoint_every).

A run evaluates on STS-B dev every `train.eval_steps` steps and reports every evaluation (metrics only). A
*resumable* checkpoint — the weights, the AdamW moments (2× the weights), the schedule and the RNG — is written and
reported only when `train.checkpoint_every` says so (every N evaluations, or the first evaluation after M minutes),
plus once at the end without the optimizer state. The storage keeps one checkpoint per run (Ray's num_to_keep=1).

The best dev model is not part of the reported checkpoint: `Persist` uploads it once, when a checkpoint falls due
after it improved, to `models/<run>/<token>/best-<step>/`, and the checkpoint carries `best.json`, a pointer to it.
So the best weights travel only when they change, and a checkpoint without a new best costs its weights and
optimizer state only. `best_model(store, checkpoint)` resolves a checkpoint's best model (older runs: `<ckpt>/best`).

Per run uploads are therefore: the final best (1× weights) + at most `checkpoints × (weights + best + 2× weights)`,
where `checkpoints` is the number of resumable checkpoints the policy takes — at most one per `checkpoint_every`
minutes of the run, none at all when the run is shorter (the quickstart's trials).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import SparseCSEError
from .io import link_or_copy

POINTER = "best.json"
META_FILE = "sparsecse.json"  # beside a saved model: its step, pooler, fingerprints (model.save_encoder)
EXTRA_FILE = "sparsecse.safetensors"  # beside a saved model: the training MLP pooler and the masks
MODELS = "models"  # the run's best-model uploads: models/stage1/<token>/…, models/trials/<trial>/<token>/…
_MINUTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:m|min|minutes?)\s*$")


def parse_every(value) -> tuple[str, float]:
    """train.checkpoint_every as ("evaluations", N) for an integer N ≥ 1, or ("minutes", M) for "Mm" / "M min"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 1:
            return "evaluations", float(value)
    elif isinstance(value, str):
        m = _MINUTES.match(value)
        if m and float(m.group(1)) > 0:
            return "minutes", float(m.group(1))
    raise SparseCSEError(f"config train.checkpoint_every: {value!r} is neither a number of evaluations (an integer "
                         ">= 1, e.g. 4) nor minutes (e.g. 30m)")


class CheckpointPolicy:
    """Decides, at each evaluation, whether a resumable checkpoint falls due; the last evaluation always does."""

    def __init__(self, every, clock: Callable[[], float] = time.monotonic):
        self.kind, self.value = parse_every(every)
        self.clock = clock
        self.evals, self.since = 0, clock()

    def due(self, final: bool) -> bool:
        self.evals += 1
        if final or (self.evals >= self.value if self.kind == "evaluations"
                     else self.clock() - self.since >= 60 * self.value):
            self.evals, self.since = 0, self.clock()
            return True
        return False


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (a hard-linked file once)."""
    seen, total = set(), 0
    for f in Path(path).rglob("*"):
        if f.is_file():
            st = f.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


@dataclass
class Uploads:
    """What a run's checkpointing cost: bytes handed to storage and seconds spent handing them (both the best-model
    uploads and the checkpoint report, which Ray uploads synchronously), and how many checkpoints it took."""

    checkpoints: int = 0
    bytes: int = 0
    weights_bytes: int = 0  # of which weights (model/ and best/)
    optimizer_bytes: int = 0  # of which trainer_state.pt (AdamW moments, schedule, RNG)
    seconds: float = 0.0

    def metrics(self) -> dict:
        return {"checkpoints": self.checkpoints, "checkpoint_bytes": self.bytes,
                "checkpoint_weights_bytes": self.weights_bytes, "checkpoint_optimizer_bytes": self.optimizer_bytes,
                "checkpoint_s": self.seconds}


class Persist:
    """Binds a run's `report(metrics, checkpoint_dir)` to the checkpoint layout above: a reported `latest/` goes
    out without its best/, whose weights are uploaded beside it only when they changed since the last upload.
    `restore(local)` brings a restored checkpoint's best model back next to it. `owner`: this process writes the
    run's checkpoints (rank 0 of stage 1, every trial). Ray-free: `report` is whatever the
    adapter binds (Tune's, Ray Train's, a list in a test)."""

    def __init__(self, store, where: str, report: Callable[[dict, "Path | None"], None], owner: bool = True):
        self.store, self.where, self.report, self.owner = store, where, report, owner
        self.token = secrets.token_hex(4)  # this run's own folder: a rerun of the same trial never deletes it
        self.uploaded: str | None = None  # the best model last uploaded (its rel)
        self.stale = False  # older best models of this run may be in storage (a new upload, or a restore)
        self.stats = Uploads()

    @property
    def prefix(self) -> str:
        return f"{MODELS}/{self.where}/{self.token}"

    def restore(self, ckpt: Path | None) -> Path | None:
        """A restored checkpoint (downloaded to `ckpt`) with its best model fetched into `ckpt/best`."""
        if ckpt is None or not (ckpt / POINTER).is_file():
            if ckpt is None and self.owner:  # a fresh start: no kept checkpoint points at an earlier attempt's
                self.store.delete(f"{MODELS}/{self.where}")  # best models (a run killed before its first report)
            return ckpt  # none, or an older run's checkpoint that holds best/ itself
        ptr = json.loads((ckpt / POINTER).read_text())
        self.token, self.uploaded, self.stale = ptr["token"], ptr["rel"], True
        self.store.download_dir(ptr["rel"], ckpt / "best")
        return ckpt

    def __call__(self, metrics: dict, ckpt: Path | None) -> None:
        if ckpt is None:
            self.report(metrics, None)
            return
        t0 = time.perf_counter()
        out = ckpt.parent / f".{ckpt.name}.upload"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ckpt, out, ignore=lambda d, names: ["best"] if Path(d) == ckpt else [],
                        copy_function=link_or_copy)
        if (ckpt / "best").is_dir():
            rel = f"{self.prefix}/best-{json.loads((ckpt / 'best' / META_FILE).read_text())['step']}"
            if rel != self.uploaded:
                self.store.upload_dir(ckpt / "best", rel)
                self._count(ckpt / "best", weights=True)
                self.uploaded, self.stale = rel, True
            (out / POINTER).write_text(json.dumps({"rel": rel, "token": self.token}) + "\n")
        self._count(out / "model", weights=True)
        self._count(out / "trainer_state.pt", weights=False)
        self.stats.bytes += sum(f.stat().st_size for f in out.iterdir() if f.is_file()
                                and f.name != "trainer_state.pt")
        try:
            self.report(metrics, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        self._prune()
        self.stats.checkpoints += 1
        self.stats.seconds += time.perf_counter() - t0

    def _count(self, path: Path, weights: bool) -> None:
        n = (dir_bytes(path) if path.is_dir() else path.stat().st_size) if path.exists() else 0
        self.stats.bytes += n
        if weights:
            self.stats.weights_bytes += n
        else:
            self.stats.optimizer_bytes += n

    def _prune(self) -> None:
        """This run's older best models: no kept checkpoint points at them any more."""
        if not self.stale:
            return
        self.stale = False
        for name in self.store.list(self.prefix):
            if f"{self.prefix}/{name}" != self.uploaded:
                self.store.delete(f"{self.prefix}/{name}")


def best_model(store, ckpt_rel: str) -> str:
    """The best dev model of a reported checkpoint (relative to the run): where its pointer says, or its own best/
    (checkpoints of runs from before the pointer)."""
    if store.is_file(f"{ckpt_rel}/{POINTER}"):
        return json.loads(store.read_bytes(f"{ckpt_rel}/{POINTER}"))["rel"]
    return f"{ckpt_rel}/best"

