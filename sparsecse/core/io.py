"""Atomic, verifiable writes: everything sparsecse writes lands complete or not at all.

A directory is built in a sibling temp dir, a manifest (size + sha256 of every file) is written
last, then the temp dir is renamed over the destination. Loaders call `verify_manifest`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .. import SparseCSEError

MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_UMASK: list[int] = []


def umask() -> int:
    """The process's umask, read once (Linux: /proc/self/status, which changes nothing; elsewhere set and restored)."""
    if not _UMASK:
        try:
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
            _UMASK.append(int(line.split()[1], 8))
        except (OSError, StopIteration, ValueError):
            old = os.umask(0o022)
            os.umask(old)
            _UMASK.append(old)
    return _UMASK[0]


def as_created(path: str | os.PathLike, is_dir: bool = False) -> None:
    """Give a temp file or folder (mkstemp: 0600, mkdtemp: 0700) the mode a plain open()/mkdir() would have given it
    under the user's umask (0644 / 0755 at umask 022), so what is renamed into place reads like any other output —
    for a model server running as another user, or a shared filesystem."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask())


def as_created_tree(root: str | os.PathLike) -> None:
    """`as_created` for a folder and everything in it (safetensors, for one, writes its files 0600)."""
    root = Path(root)
    as_created(root, is_dir=True)
    for p in root.rglob("*"):
        if not p.is_symlink():
            as_created(p, is_dir=p.is_dir())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def manifest_of(directory: str | os.PathLike) -> dict:
    """{"files": {relative path: {"size", "sha256"}}} of every file under `directory` (its manifest.json aside)."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return {"files": files}


def write_manifest(directory: str | os.PathLike) -> dict:
    manifest = manifest_of(directory)
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def verify_manifest(directory: str | os.PathLike, *, required: bool = True) -> None:
    """Refuse a directory whose files do not match its manifest (partial or corrupted write)."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.exists():
        if required:
            raise SparseCSEError(f"{directory}: no {MANIFEST}; the write was interrupted or this is not a "
                                 "sparsecse output — re-create it")
        return
    try:
        files = json.loads(mpath.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise SparseCSEError(f"{mpath}: unreadable manifest ({e}); re-create {directory}") from None
    for rel, meta in files.items():
        p = directory / rel
        if not p.exists() or p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            raise SparseCSEError(f"{p}: does not match {mpath} (truncated or modified); re-create {directory}")


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the complete directory `tmp` (a sibling of `dest`) over `dest`; the old version goes only after."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp dir; on success write its manifest and move it to `dest` in one rename.

    On any exception the temp dir is removed and `dest` keeps its previous complete version.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise SparseCSEError(f"{dest}: already exists; choose another --out or remove it")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        yield tmp
        write_manifest(tmp)
        as_created_tree(tmp)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parquet_bytes(table) -> bytes:
    """A pyarrow Table, or a list of flat records, as the bytes of one Parquet file."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pylist(table)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem allows one (files that never change once written), else a copy."""
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)
