"""The one output rule every command follows, checked before any work starts:

    a command writes only into a path that is new (or an empty directory), or that holds its own earlier output of
    the same kind — recognised by what that command writes — and the user asked to replace it (`--overwrite`).
    A file where a directory goes, a directory where a file goes, a non-empty folder of anything else, or a file
    sparsecse did not write is refused with one line, and nothing is deleted, moved or hidden.

Kinds and how an earlier output of each is recognised:
    train    a directory with config.yaml and best/ or latest/ (`sparsecse train`, `prune --retrain`)
    prune    a directory with masked/ (`sparsecse prune`), or a train output (with --retrain)
    export   a directory with manifest.json and pruned/ (`sparsecse export`)
    pilot    a directory with pilot.json (`sparsecse pilot --out`)
    scores   a Parquet file with sparsecse's scores schema (`sparsecse score`)
    results  a JSON object of task scores (`sparsecse eval --json`)
A sweep's directory is its own kind (sweep.json), handled by the sweep's --resume rules.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import SparseCSEError
from .config import STS_TASKS, TRANSFER_TASKS

DIR_KINDS = {
    "train": (("config.yaml", "best"), ("config.yaml", "latest")),
    "prune": (("masked",), ("config.yaml", "best"), ("config.yaml", "latest")),
    "export": (("manifest.json", "pruned"),),
    "pilot": (("pilot.json",),),
}
WHAT = {"train": "a training run", "prune": "a pruned model", "export": "an export", "pilot": "a pilot study",
        "scores": "a scores file", "results": "an evaluation's results"}


def dir_kind(path: Path) -> str | None:
    """Which sparsecse output a directory holds (the first kind whose files are all there), else None."""
    if (path / "sweep.json").is_file():
        return "sweep"
    for kind, patterns in DIR_KINDS.items():
        if any(all((path / f).exists() for f in pat) for pat in patterns):
            return kind
    return None


def _is_scores(path: Path) -> bool:
    try:
        import pyarrow.parquet as pq

        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - not Parquet at all
        return False
    return b"sparsecse" in meta


def _is_results(path: Path) -> bool:

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    known = {*STS_TASKS, *TRANSFER_TASKS, "avg", "transfer_avg", "MRPC_f1"}
    return isinstance(data, dict) and bool(data) and set(data) <= known


FILE_KINDS = {"scores": _is_scores, "results": _is_results}


def claim(path: str | Path, kind: str, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """Check `path` may receive this command's output of `kind` (the rule above); returns it as a Path. Call it
    before computing anything."""
    p = Path(path)
    replace = f"pass --overwrite to replace it, or choose another {flag}"
    if kind in FILE_KINDS:
        if p.is_dir():
            raise SparseCSEError(f"{flag} {p}: is a directory; give a file path (nothing was written)")
        if p.exists():
            if not FILE_KINDS[kind](p):
                raise SparseCSEError(f"{flag} {p}: a file sparsecse did not write is there; choose another {flag} "
                                     "(it was left as it is)")
            if not overwrite:
                raise SparseCSEError(f"{flag} {p}: holds {WHAT[kind]} already; {replace}")
        if p.parent.exists() and not p.parent.is_dir():
            raise SparseCSEError(f"{flag} {p}: {p.parent} is a file, not a directory")
        return p
    if p.exists() and not p.is_dir():
        raise SparseCSEError(f"{flag} {p}: is a file; choose a new directory path (the file was left as it is)")
    if p.is_dir() and any(p.iterdir()):
        found = dir_kind(p)
        if found != kind and not (kind == "prune" and found == "train"):
            what = f"holds {WHAT.get(found, 'a sweep')}" if found else "holds files sparsecse did not write"
            raise SparseCSEError(f"{flag} {p}: {what}; choose a new or empty directory (nothing was changed)")
        if not overwrite:
            raise SparseCSEError(f"{flag} {p}: holds {WHAT[kind]} already; {replace}")
        if kind == "export":  # an export is replaced as a whole: only if all of it is the export's own
            extra = _unlisted(p)
            if extra:
                raise SparseCSEError(f"{flag} {p}: holds files the export did not write ({', '.join(extra[:3])}); "
                                     "move them out first or choose another --out (nothing was changed)")
    return p


def _unlisted(export_dir: Path) -> list[str]:
    """Files in an export directory that its manifest.json does not list (put there by someone else)."""
    try:
        listed = set(json.loads((export_dir / "manifest.json").read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        listed = set()
    return sorted(q.relative_to(export_dir).as_posix() for q in export_dir.rglob("*")
                  if q.is_file() and q.name != "manifest.json" and q.relative_to(export_dir).as_posix() not in listed)
