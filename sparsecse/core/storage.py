"""Where a sweep's artifacts live: a local/NFS directory or any URI pyarrow (or fsspec) opens — s3://, gs://, abfs://.

A `Storage` is the run's root; every path it takes is relative to that root (posix, "scores.parquet",
"simcse/best"). Nothing here assumes the caller's node can see the same disk as any other node: tasks on other
nodes get the root URI, open their own `Storage`, download what they read into node-local scratch and upload what
they write. Ray's Train/Tune storage is pointed at the same root (`ray_storage`).

Writes land whole or not at all: a local file is written to a temp file and renamed; an object store PUT is
atomic by itself. A directory is uploaded with its manifest.json last; readers verify it after download.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .. import SparseCSEError
from .io import as_created_tree, atomic_write_bytes, replace_dir, verify_manifest

_SCHEME_SEP = "://"


def is_uri(s: str) -> bool:
    return _SCHEME_SEP in str(s) and not str(s).startswith("file://")


FSSPEC_STORES = ("abfs", "abfss", "az", "adl", "gs", "gcs", "s3", "s3a", "oss", "memory")  # object stores fsspec opens


def _open_fs(uri: str):
    """(filesystem, root path inside it) for a local path or a URI; one-line errors for what cannot be opened."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_uri(uri):
        local = Path(str(uri).removeprefix("file://")).expanduser().resolve()
        return pafs.LocalFileSystem(), local.as_posix()
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as arrow_err:
        try:  # an object store pyarrow lacks but an installed fsspec implementation has (e.g. abfs:// via adlfs)
            import fsspec

            proto, path = uri.split(_SCHEME_SEP, 1)
            if proto not in FSSPEC_STORES:  # ftp://, http://…: not a run's storage (and fsspec's would need a host)
                raise ValueError(proto)
            return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(proto))), path.rstrip("/")
        except Exception:  # noqa: BLE001 - report the original, more specific reason
            raise SparseCSEError(f"--out {uri}: cannot open this storage ({str(arrow_err).splitlines()[0]}); use a "
                                 "local/NFS path or an s3://, gs:// or abfs:// URI with its client installed") from None
    except OSError as e:
        raise SparseCSEError(f"--out {uri}: cannot open this storage ({str(e).splitlines()[0]}); check the "
                             "credentials and endpoint (AWS_ENDPOINT_URL, AWS_* / GOOGLE_* variables)") from None


_ABANDONED: list = []  # probe threads given up on while still waiting


def abandoned_probes() -> bool:
    """Whether a storage probe is still waiting after open_storage gave up on it (the CLI then exits at once)."""
    return any(t.is_alive() for t in _ABANDONED)


def probe_timeout_s() -> float:
    """How long a command without a config (data stage, export) waits for cloud storage to answer:
    $SPARSECSE_CONNECT_TIMEOUT_S, else 60 s (a sweep uses ray.connect_timeout_s)."""
    try:
        return float(os.environ.get("SPARSECSE_CONNECT_TIMEOUT_S", "60"))
    except ValueError:
        raise SparseCSEError("SPARSECSE_CONNECT_TIMEOUT_S: not a number of seconds") from None


def open_storage(uri: str, timeout_s: float = 60.0, flag: str = "--out") -> "Storage":
    """`Storage(uri)`, probed (does the root exist?) within `timeout_s`: a cloud filesystem without credentials can
    look for them for minutes (GCS asks a metadata server), a paused endpoint can hang. Past the time, one line
    naming the storage; a local path is never waited for."""
    import threading

    if not is_uri(uri):
        return Storage(uri)
    out: dict = {}

    def probe() -> None:
        try:
            store = Storage(uri)
            store.exists()
            out["store"] = store
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = e

    worker = threading.Thread(target=probe, name="sparsecse-storage-probe", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        _ABANDONED.append(worker)
        raise SparseCSEError(f"{flag} {uri}: the storage did not answer within {timeout_s:g} s; check its credentials, "
                             "endpoint (AWS_ENDPOINT_URL …) and network, or raise ray.connect_timeout_s")
    if "error" in out:
        raise out["error"]
    return out["store"]


class Storage:
    """The root of one run on some filesystem. Paths given to the methods are relative to the root."""

    def __init__(self, uri: str | os.PathLike):
        uri = str(uri)
        self.fs, self.root = _open_fs(uri)
        self.is_local = type(self.fs).__name__ == "LocalFileSystem"
        self.uri = self.root if self.is_local else uri.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        """What to show a user (and what `Storage(...)` reopens): the root URI joined with `rel`."""
        return posixpath.join(self.uri, rel) if rel else self.uri

    def rel(self, fs_path: str) -> str:
        """A path inside this filesystem (as Ray's Result/Checkpoint report it) made relative to the root."""
        fs_path = fs_path.split(_SCHEME_SEP, 1)[-1] if is_uri(fs_path) else fs_path
        root = self.root.rstrip("/") + "/"
        if not fs_path.startswith(root):
            raise SparseCSEError(f"{fs_path}: is not inside the run {self.uri}")
        return fs_path[len(root):]

    def ray_storage(self) -> tuple[str, object | None]:
        """(storage_path, storage_filesystem) for Ray's RunConfig / Tuner.restore: the same root and filesystem."""
        return (self.root, None) if self.is_local else (self.root, self.fs)

    # ------------------------------------------------------------------ queries
    def _info(self, rel: str):
        try:
            return self.fs.get_file_info(self.path(rel))
        except OSError as e:
            raise SparseCSEError(f"{self.url(rel)}: cannot read ({str(e).splitlines()[0]}); check access to "
                                 "the storage") from None

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.Directory

    def list(self, rel: str = "") -> list[str]:
        """Names directly under `rel` ([] when it does not exist)."""
        import pyarrow.fs as pafs

        if not self.is_dir(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=False))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def sizes(self, rel: str = "") -> dict[str, int]:
        """{path relative to `rel`: size in bytes} of every file under `rel`, in one listing ({} when absent)."""
        import pyarrow.fs as pafs

        if not self.is_dir(rel):
            return {}
        base = self.path(rel).rstrip("/") + "/"
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=True))
        return {i.path.split(base, 1)[-1]: i.size for i in infos if i.type == pafs.FileType.File}

    # ------------------------------------------------------------------ files
    def read_bytes(self, rel: str) -> bytes:
        if not self.is_file(rel):
            raise SparseCSEError(f"{self.url(rel)}: not found in the run; was the stage that writes it finished?")
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str):
        try:
            return json.loads(self.read_bytes(rel))
        except ValueError as e:
            raise SparseCSEError(f"{self.url(rel)}: not valid JSON ({e}); restore it or start a new run") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.is_local:
            atomic_write_bytes(self.path(rel), data)
            return
        with self.fs.open_output_stream(self.path(rel)) as f:  # one object, visible only once closed
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ directories
    def upload_dir(self, local: str | os.PathLike, rel: str, replace: bool = True) -> None:
        """Put the local directory at `rel`, replacing what was there (`replace=False`: adding to it, e.g. the
        event files of a TensorBoard run); manifest.json (if any) lands last."""
        import pyarrow.fs as pafs

        local = Path(local)
        if not local.is_dir():
            return
        if self.is_local and not replace:
            shutil.copytree(local, self.path(rel), dirs_exist_ok=True)
            return
        if self.is_local:  # build beside the destination, then one rename
            dest = Path(self.path(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
            try:
                shutil.copytree(local, tmp, dirs_exist_ok=True)
                as_created_tree(tmp)
                replace_dir(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return
        if replace:
            self.delete(rel)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == "manifest.json")  # readers take the manifest as "complete"
        local_fs = pafs.LocalFileSystem()
        for p in files:
            dst = self.path(posixpath.join(rel, p.relative_to(local).as_posix()))
            pafs.copy_files(p.as_posix(), dst, source_filesystem=local_fs, destination_filesystem=self.fs)

    def download_dir(self, rel: str, local: str | os.PathLike) -> Path:
        import pyarrow.fs as pafs

        if not self.is_dir(rel):
            raise SparseCSEError(f"{self.url(rel)}: not found in the run; was the stage that writes it finished?")
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), local.as_posix(), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local

    def copy_dir(self, src_rel: str, dst_rel: str) -> None:
        """Copy inside the run (e.g. stage 1's checkpoint to simcse/): through a local temp dir, so it is atomic."""
        with scratch_dir("copy") as tmp:
            self.upload_dir(self.download_dir(src_rel, tmp / "d"), dst_rel)

    def delete(self, rel: str) -> None:
        import pyarrow.fs as pafs

        info = self._info(rel)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))


def probe_write(store: "Storage", flag: str) -> None:
    """Writes and deletes a probe in `store`, leaving nothing it created (the root and, on a local disk, each
    missing parent folder included); a store that cannot be written — permission denied or a read-only filesystem,
    for root too — is one line naming `flag`."""
    import secrets

    probe, made = f".probe-{secrets.token_hex(4)}", _missing_dirs(store)
    try:
        store.write_text(probe, "can this be written?\n")
    except OSError as e:
        why = e.strerror or str(e).splitlines()[0][:160]
        raise SparseCSEError(f"{flag} {store.uri}: cannot be written ({why}); choose a location you can write"
                             ) from None
    finally:
        with contextlib.suppress(OSError):
            store.delete(probe)
        if made:  # the root did not exist: neither does it after the probe (an object store's marker included)
            with contextlib.suppress(OSError):
                store.fs.delete_dir(store.root)
            for d in made[1:]:  # the parent folders the probe created, innermost first
                with contextlib.suppress(OSError):
                    os.rmdir(d)


def _missing_dirs(store: "Storage") -> list[str]:
    """The root and, on a local disk, each missing parent of it, innermost first ([] when the root exists): what
    writing into it would create."""
    if store.exists():
        return []
    if not store.is_local:
        return [store.root]
    out = []
    for d in (Path(store.root), *Path(store.root).parents):
        if d.exists():
            break
        out.append(str(d))
    return out


def cache_root() -> Path:
    """This machine's sparsecse cache ($SPARSECSE_CACHE, else ~/.cache/sparsecse): staged data, tracking copies."""
    return Path(os.environ.get("SPARSECSE_CACHE", "~/.cache/sparsecse")).expanduser()


@contextlib.contextmanager
def scratch_dir(what: str) -> Iterator[Path]:
    """Node-local scratch for one task or trial (TMPDIR of the node), removed when the block ends."""
    d = Path(tempfile.mkdtemp(prefix=f"sparsecse-{what}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fetch_model(store: Storage, rel: str, scratch: Path) -> Path:
    """Download a saved model directory from the run into scratch and verify it against its manifest."""
    local = store.download_dir(rel, scratch / rel.replace("/", "_"))
    verify_manifest(local)
    return local
