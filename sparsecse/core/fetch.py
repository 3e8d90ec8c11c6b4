"""`sparsecse data fetch`: download the SentEval bundle and wiki1m_for_simcse.txt from their public locations
(the ones SimCSE's download scripts use), with a progress bar and sha256 checks, into the data dir.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .. import SparseCSEError
from .io import as_created, atomic_write_text

DEFAULT_BASE_URL = "https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main"


@dataclass(frozen=True)
class Source:
    name: str  # file name under the base URL
    dest: str  # where it lands in the data dir
    sha256: str | None  # expected digest; None: recorded at first download in SHA256SUMS, checked afterwards
    archive: bool = False


SOURCES = (
    Source("senteval.tar", "senteval", None, archive=True),
    Source("wiki1m_for_simcse.txt", "wiki/wiki1m_for_simcse.txt", None),
)


def _download(url: str, dest: Path, progress: bool = True) -> str:
    """Stream `url` to `dest` (via a temp file); return its sha256."""
    h = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, os.fdopen(fd, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name)
            while chunk := r.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                if bar:
                    bar.update(len(chunk))
            if bar:
                bar.close()
        as_created(tmp)
        os.replace(tmp, dest)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise SparseCSEError(f"{url}: download failed ({e}); check the network or pass --base-url") from None
    return h.hexdigest()


def _safe_extract(archive: Path, into: Path, url: str) -> None:
    """Unpack into `into` only: the "data" filter refuses absolute paths, '..', links out of the tree and device
    files; a refused or unreadable archive is a one-line error and nothing from it is installed."""
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise SparseCSEError(f"{url}: archive refused ({type(e).__name__}: {e}); nothing was installed — "
                             "check --base-url points at the SentEval bundle") from None


def fetch(data_dir: str | os.PathLike, base_url: str = DEFAULT_BASE_URL, sources=SOURCES,
          expected: dict[str, str] | None = None, progress: bool = True) -> list[Path]:
    """Download and check every source; a mismatching checksum leaves nothing in place."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    sums_path = data_dir / "SHA256SUMS"
    known = {}
    if sums_path.exists():
        for line in sums_path.read_text().splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                known[name.strip()] = digest
    known.update(expected or {})
    done = []
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".fetch-") as tmpd:
        for src in sources:
            url = f"{base_url.rstrip('/')}/{src.name}"
            part = Path(tmpd) / src.name
            digest = _download(url, part, progress)
            want = src.sha256 or known.get(src.name)
            if want and digest != want:
                raise SparseCSEError(f"{url}: sha256 {digest} does not match the expected {want}; "
                                     "the download is corrupt or the source changed — nothing was installed")
            known[src.name] = digest
            target = data_dir / src.dest
            if src.archive:
                stage = Path(tmpd) / (src.name + ".x")
                _safe_extract(part, stage, url)
                root = stage / src.dest if (stage / src.dest).is_dir() else stage
                if target.exists():
                    shutil.rmtree(target)
                os.replace(root, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, target)
            done.append(target)
    atomic_write_text(sums_path, "".join(f"{d}  {n}\n" for n, d in sorted(known.items())))
    return done
