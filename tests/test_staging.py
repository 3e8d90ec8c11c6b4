"""Data and models staged once in storage (`sparsecse data stage`), fetched and verified per node (staging.py), on
the moto S3 endpoint. The two-node cluster sweep of tests/test_cluster.py runs from a staged copy."""

from __future__ import annotations

import json

import boto3

import pytest

from sparsecse import SparseCSEError


def test_stage_then_every_node_gets_a_verified_copy_once(s3, tiny_data_dir, tiny_model_dir, tmp_path, monkeypatch,
                                                          capsys):
    from sparsecse.core import staging
    from sparsecse.cli import main
    from sparsecse.method.model import load_encoder, resolve_model_path

    monkeypatch.setenv("SPARSECSE_CACHE", str(tmp_path / "cache"))
    to = f"s3://{s3.bucket}/staged"
    before = sorted(p.name for p in tiny_data_dir.rglob("*"))
    assert main(["data", "stage", "--to", to, "--data-dir", str(tiny_data_dir), "--model", f"{tiny_model_dir}@v1"]) == 0
    out = capsys.readouterr().out
    assert f"--set data.dir={to}/data" in out and f"--set model.name={to}/models/{tiny_model_dir.name}@v1" in out
    assert sorted(p.name for p in tiny_data_dir.rglob("*")) == before  # the source is not touched (no manifest)
    data = staging.local(f"{to}/data")
    assert (data / "wiki" / "wiki1m_sample.txt").read_bytes() == (tiny_data_dir / "wiki" / "wiki1m_sample.txt").read_bytes()
    calls = []
    monkeypatch.setattr("sparsecse.core.storage.Storage.read_bytes", lambda self, rel: calls.append(rel) or b"")
    assert staging.local(f"{to}/data") == data and not calls  # fetched once per node, then reused
    monkeypatch.undo()
    monkeypatch.setenv("SPARSECSE_CACHE", str(tmp_path / "cache"))
    model_uri = f"{to}/models/{tiny_model_dir.name}@v1"
    enc = load_encoder(model_uri)  # model.name may be a staged URI: loaded from the node's verified copy
    assert enc.backbone.config.hidden_size > 0 and resolve_model_path(model_uri).startswith(str(tmp_path / "cache"))
    manifest = json.loads(boto3.client("s3").get_object(Bucket=s3.bucket, Key="staged/data/manifest.json")["Body"].read())
    assert manifest["kind"] == "data" and all(len(m["sha256"]) == 64 for m in manifest["files"].values())


def test_a_corrupted_staged_object_fails_in_one_line_naming_it(s3, tiny_data_dir, tmp_path, monkeypatch):
    from sparsecse.core import staging

    monkeypatch.setenv("SPARSECSE_CACHE", str(tmp_path / "cache"))
    to = f"s3://{s3.bucket}/corrupt"
    staging.stage(to, tiny_data_dir, None)
    boto3.client("s3").put_object(Bucket=s3.bucket, Key="corrupt/data/wiki/wiki1m_sample.txt", Body=b"not the staged bytes\n")
    with pytest.raises(SparseCSEError) as e:
        staging.local(f"{to}/data")
    msg = str(e.value)
    assert msg.startswith(f"{to}/data/wiki/wiki1m_sample.txt: does not match the staged manifest") and "\n" not in msg
    assert not list((tmp_path / "cache").rglob("wiki1m_sample.txt"))  # nothing half-verified left for the next run
    with pytest.raises(SparseCSEError, match="not a staged copy"):
        staging.local(f"s3://{s3.bucket}/nothing-here")


def test_sweep_check_reads_a_staged_copy_without_downloading_it_and_names_a_missing_object(
        s3, tiny_data_dir, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`sparsecse sweep --check` (what k8s-submit's Job runs) accepts a complete staged data dir and model from one
    listing each, and names the object a partial copy lacks."""
    from sparsecse.core import staging
    from sparsecse.cli import main

    monkeypatch.setenv("SPARSECSE_CACHE", str(tmp_path / "cache"))
    to = f"s3://{s3.bucket}/chk"
    staged = staging.stage(to, tiny_data_dir, f"{tiny_model_dir}@v1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {staged['model.name']}}}\neval: {{tasks: [STSBenchmark]}}\n"
                   "sweep: {sparsities: [0.1], lams: [0.5]}\n")
    argv = ["sweep", str(cfg), "--out", f"s3://{s3.bucket}/chk-run", "--data-dir", staged["data.dir"], "--check"]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"data {staged['data.dir']} (staged)" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()  # nothing fetched to check it
    assert not boto3.client("s3").list_objects_v2(Bucket=s3.bucket, Prefix="chk-run").get("KeyCount")
    boto3.client("s3").delete_object(Bucket=s3.bucket, Key="chk/data/wiki/wiki1m_sample.txt")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sparsecse: error: {to}/data/wiki/wiki1m_sample.txt: missing; re-stage it with `sparsecse data stage`"
