"""Data and models staged once in the run's storage, so no node downloads from the hub or the SentEval server.

`sparsecse data stage --to URI [--data-dir D] [--model NAME@REVISION]` copies the data dir (SentEval bundle, wiki1m)
to URI/data and a model snapshot at a pinned revision to URI/models/NAME@REVISION, each with a manifest of every
file's size and sha256 (written last: a staged copy counts only once complete). Configs then point at them:
`data.dir: URI/data`, `model.name: URI/models/NAME@REVISION`.

On a node, `local(URI)` is that copy as a node-local directory: downloaded once per node (a file lock keeps the
trials of one node from fetching it twice; later runs reuse it), every file checked against the manifest, each
download retried with backoff. A file whose bytes do not match fails in one line naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from .. import SparseCSEError
from .io import manifest_of, sha256_file
from .storage import Storage, cache_root, is_uri, open_storage, probe_timeout_s, probe_write

MANIFEST = "manifest.json"
_DONE = ".staged-complete"


def is_staged_uri(s: str | os.PathLike | None) -> bool:

    return s is not None and is_uri(str(s))


_STAGING = ".sparsecse-staging"  # written first, removed after the manifest: an interrupted stage is still ours


def _ours(store, rel: str, kind: str) -> bool:
    """Whether `rel` holds nothing, or only what `data stage` wrote there (a complete or interrupted staged copy of
    the same kind): only then may it be replaced."""
    if store.is_local and Path(store.path(rel)).is_symlink():
        return False
    if not store.exists(rel):
        return True
    if store.is_file(rel):
        return False
    for marker in (MANIFEST, _STAGING):
        if store.is_file(f"{rel}/{marker}"):
            with contextlib.suppress(SparseCSEError):
                if store.read_json(f"{rel}/{marker}").get("kind") == kind:
                    return True
    return not store.list(rel)


def _upload(local: Path, store, rel: str, extra: dict) -> dict:
    """`local` to `rel` in the storage with its manifest (computed here: the source directory is not touched).
    What is at `rel` is replaced only when it is an earlier staged copy of the same kind; anything else there — the
    user's files, a link — is refused in one line and left as it was."""
    manifest = {**manifest_of(local), **extra}
    if not manifest["files"]:
        raise SparseCSEError(f"{local}: no files to stage")
    if not _ours(store, rel, extra["kind"]):
        raise SparseCSEError(f"--to {store.uri}: {rel} already exists and was not staged by sparsecse (or is a link); "
                             "nothing was changed — choose another --to or move it away")
    store.delete(rel)
    store.write_json(f"{rel}/{_STAGING}", {"kind": extra["kind"]})
    store.upload_dir(local, rel, replace=False)
    store.write_json(f"{rel}/{MANIFEST}", manifest)  # its presence means the copy is complete
    store.delete(f"{rel}/{_STAGING}")
    return manifest


def _snapshot(name: str, revision: str | None) -> tuple[Path, str]:
    """A hub model's snapshot at `revision` (a local directory is taken as it is, revision "local")."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser(), revision or "local"
    try:
        from huggingface_hub import HfApi, snapshot_download

        sha = HfApi().model_info(name, revision=revision).sha
        return Path(snapshot_download(name, revision=sha)), sha
    except Exception as e:  # noqa: BLE001 - offline, unknown repo or revision: one line
        raise SparseCSEError(f"--model {name}@{revision or 'main'}: cannot download it from the hub "
                             f"({str(e).splitlines()[0][:160]}); check the name and revision, or stage a local "
                             "directory") from None


def _target(to: str, timeout_s: float | None = None) -> Storage:
    """The storage `--to` names, probed within `timeout_s`; a local path must be a directory that can be written."""
    if not str(to).strip():
        raise SparseCSEError("--to: empty; pass a directory or a URI such as s3://bucket/staged")
    store = open_storage(str(to), timeout_s or probe_timeout_s(), flag="--to")
    if store.is_local:
        root = Path(store.root)
        parent = next((p for p in (root, *root.parents) if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise SparseCSEError(f"--to {to}: {parent} is a file, not a directory; choose a directory path")
    probe_write(store, "--to")  # permission denied, a read-only filesystem: one line, nothing created
    return store


def stage(to: str, data_dir: Path | None, model: str | None) -> dict[str, str]:
    """Stage the data dir and/or a model under `to`; returns {what: URI} for the config."""
    if data_dir is None and model is None:
        raise SparseCSEError("data stage: nothing to stage; pass --data-dir and/or --model NAME@REVISION")
    store, out = _target(to), {}
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise SparseCSEError(f"--data-dir {data_dir}: not a directory; run `sparsecse data fetch` first")
        m = _upload(Path(data_dir), store, "data", {"kind": "data"})
        out["data.dir"] = store.url("data")
        print(f"[stage] {len(m['files'])} data files -> {out['data.dir']}")
    if model is not None:
        name, _, revision = model.partition("@")
        path, rev = _snapshot(name, revision or None)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name if Path(name).expanduser().is_dir() else name)
        rel = f"models/{safe}@{rev}"
        m = _upload(path, store, rel, {"kind": "model", "name": name, "revision": rev})
        out["model.name"] = store.url(rel)
        print(f"[stage] {len(m['files'])} model files ({name} at {rev}) -> {out['model.name']}")
    return out


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _with_retries(what: str, fn, tries: int = 4):
    for i in range(tries):
        try:
            return fn()
        except SparseCSEError:
            raise
        except Exception as e:  # noqa: BLE001 - a storage hiccup: back off and retry
            if i == tries - 1:
                raise SparseCSEError(f"{what}: could not be read after {tries} tries ({str(e).splitlines()[0][:160]})"
                                     ) from None
            time.sleep(min(30.0, 2.0 ** i))


def check_staged(uri: str, what: str) -> int:
    """A staged copy is complete in storage: its manifest is there and every file it lists has that size (one
    listing, nothing downloaded; the nodes check the sha256 when they fetch). Returns the number of files."""
    uri = str(uri).rstrip("/")
    store = Storage(uri)
    if not store.is_file(MANIFEST):
        raise SparseCSEError(f"{what} {uri}: not a staged copy ({MANIFEST} missing); stage it with "
                             "`sparsecse data stage --to …`")
    files = json.loads(store.read_bytes(MANIFEST))["files"]
    sizes = store.sizes()
    for rel, meta in files.items():
        if sizes.get(rel) != meta["size"]:
            found = "missing" if rel not in sizes else f"{sizes[rel]} bytes, the manifest says {meta['size']}"
            raise SparseCSEError(f"{uri}/{rel}: {found}; re-stage it with `sparsecse data stage`")
    return len(files)


def local(uri: str | os.PathLike) -> Path:
    """A staged URI as a verified node-local directory (a local path is returned as it is)."""
    if not is_staged_uri(uri):
        return Path(uri).expanduser()

    uri = str(uri).rstrip("/")
    dest = cache_root() / "staged" / hashlib.sha1(uri.encode()).hexdigest()[:16]
    with _locked(dest.with_suffix(".lock")):
        if (dest / _DONE).is_file():
            return dest
        store = Storage(uri)
        if not _with_retries(f"{uri}/{MANIFEST}", lambda: store.is_file(MANIFEST)):
            raise SparseCSEError(f"{uri}: not a staged copy ({MANIFEST} missing); stage it with "
                                 "`sparsecse data stage --to …`")
        files = json.loads(_with_retries(f"{uri}/{MANIFEST}", lambda: store.read_bytes(MANIFEST)))["files"]
        shutil.rmtree(dest, ignore_errors=True)
        for rel, meta in files.items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_with_retries(f"{uri}/{rel}", lambda rel=rel: store.read_bytes(rel)))
            if target.stat().st_size != meta["size"] or sha256_file(target) != meta["sha256"]:
                shutil.rmtree(dest, ignore_errors=True)
                raise SparseCSEError(f"{uri}/{rel}: does not match the staged manifest (sha256 or size); re-stage "
                                     "it with `sparsecse data stage`")
        (dest / _DONE).write_text(uri + "\n")
    return dest
