"""Data loaders against SentEval conventions, bad-input errors (exit 2, one line, nothing written), data fetch."""

import http.server
import io
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from sparsecse import SparseCSEError
from sparsecse.method.data import load_sick, load_sts_year, load_stsb, resolve_data_dir


def run_cli(*args, env=None, cwd=None):
    import os

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sparsecse", *args], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=600)


def test_real_sts_loaders_match_senteval_counts(data_dir):
    counts = {y: sum(len(p) for p in load_sts_year(data_dir, y).values())
              for y in ("STS12", "STS13", "STS14", "STS15", "STS16")}
    assert counts == {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186}
    assert [len(load_stsb(data_dir, s)) for s in ("train", "dev", "test")] == [5749, 1500, 1379]
    assert len(load_sick(data_dir, "test")) == 4927


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv("SPARSECSE_DATA_DIR", str(b))
    assert resolve_data_dir(a) == a.resolve()
    assert resolve_data_dir(None) == b.resolve()
    monkeypatch.setenv("SPARSECSE_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(SparseCSEError, match="does not exist"):
        resolve_data_dir(None)


def _stsb_dir(tmp_path, lines):
    p = tmp_path / "senteval" / "STS" / "STSBenchmark" / "sts-test.csv"
    p.parent.mkdir(parents=True)
    p.write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.mark.parametrize("lines,needle", [
    (["a\tb\tc\t1\t2.5\tone sentence"], "sts-test.csv:1: expected >= 7"),
    (["a\tb\tc\t1\t2.5\tx\ty", "a\tb\tc\t1\tfive\tx\ty"], "sts-test.csv:2: score 'five' is not a number"),
])
def test_bad_sts_files_name_file_and_line(tmp_path, lines, needle):
    d = _stsb_dir(tmp_path, lines)
    with pytest.raises(SparseCSEError, match=needle):
        load_stsb(d, "test")


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_model_dir):
    d = _stsb_dir(tmp_path / "data", ["a\tb\tc\t1\tNaNx\tx\ty"])
    out = tmp_path / "res.json"
    r = run_cli("eval", "--model", str(tiny_model_dir), "--tasks", "STSBenchmark", "--data-dir", str(d), "--json", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "sts-test.csv:1" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["eval", "--model", "/nonexistent/model", "--data-dir", "."], "not a loadable model"),
    (["train", "--config", "missing.yaml", "--out", "x"], "config file not found"),
    (["prune", "--pretrained", "minilm", "--scores", "s.parquet", "--sparsity", "1.0", "--lam", "0.5", "--out", "o"],
     "--sparsity 1.0"),
    (["prune", "--pretrained", "minilm", "--scores", "s.parquet", "--sparsity", "0.1", "--lam", "-1", "--out", "o"],
     "--lam -1"),
    (["sweep", "sweeps/quickstart.yaml", "--set", "train.bogus=1", "--out", "o"], "train.bogus: unknown key"),
    (["sweep", "sweeps/quickstart.yaml", "--set", "sweep.trial_gpus=1", "--out", "o"], "sweep.trial_gpus"),
    (["sweep", "sweeps/quickstart.yaml", "--set", "ray.num_workers=64", "--out", "o"], "ray.num_workers"),
    (["sweep", "sweeps/quickstart.yaml", "--resume", "--out", "o"], "holds no sweep"),
    (["sweep", "sweeps/quickstart.yaml", "--out", "sweeps/quickstart.yaml"], "--out sweeps/quickstart.yaml: is a file"),
    (["sweep", "sweeps/quickstart.yaml", "--out", "nosuch://bucket/run"], "--out nosuch://bucket/run: cannot open"),
    (["sweep", "sweeps/quickstart.yaml", "--set", "train.batch_size=33", "--set", "ray.num_workers=2", "--out", "o",
      "--address", "127.0.0.1:1"], "not divisible by ray.num_workers=2"),  # checked before joining any cluster
    (["sweep", "sweeps/quickstart.yaml", "--resume", "--resume-if-exists", "--out", "o"], "pass one"),
])
def test_cli_user_errors(tmp_path, data_dir, args, needle, monkeypatch, capsys):
    """In-process (`main`, as the console script calls it): the exit code and the one line on stderr. The process
    level — a real `python -m sparsecse`, nothing else printed — is test_bad_inputs' and the test above."""
    import shutil

    from sparsecse.cli import main

    shutil.copytree(Path(__file__).resolve().parents[1] / "sweeps", tmp_path / "sweeps")
    monkeypatch.setenv("SPARSECSE_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    rc = main(list(args))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()


def test_corpus_errors(tmp_path, tiny_model_dir):
    from sparsecse.method.data import load_corpus
    from sparsecse.method.model import load_encoder

    tok = load_encoder(str(tiny_model_dir)).tokenizer
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SparseCSEError, match="empty"):
        load_corpus(empty, tok, 32)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02hello\x00")
    with pytest.raises(SparseCSEError, match="binary"):
        load_corpus(binary, tok, 32)
    ok = tmp_path / "ok.txt"
    ok.write_text("one sentence\n\nanother one here\n")
    ds = load_corpus(ok, tok, 32)
    assert len(ds) == 2


def test_output_dir_holding_something_else_is_refused(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {tiny_model_dir}}}\ntrain: {{max_steps: 1}}\n")
    r = run_cli("train", "--config", str(cfg), "--out", str(out), "--data-dir", str(data_dir))
    assert r.returncode == 2 and "holds files sparsecse did not write" in r.stderr
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def _serve(directory: Path):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(directory), **k)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_data_fetch_from_local_http_server(tmp_path):
    from sparsecse.core.fetch import fetch

    src = tmp_path / "srv"
    src.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = b"a\tb\tc\t1\t2.5\tx y\tx z\n"
        info = tarfile.TarInfo("senteval/STS/STSBenchmark/sts-test.csv")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (src / "senteval.tar").write_bytes(buf.getvalue())
    (src / "wiki1m_for_simcse.txt").write_text("first sentence\nsecond sentence\n")
    srv = _serve(src)
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        dest = tmp_path / "data"
        fetch(dest, base_url=url, progress=False)
        assert len(load_stsb(dest, "test")) == 1
        assert (dest / "wiki" / "wiki1m_for_simcse.txt").read_text().startswith("first")
        sums = (dest / "SHA256SUMS").read_text()
        assert "senteval.tar" in sums and "wiki1m_for_simcse.txt" in sums
        # the source changes: the recorded checksum refuses it and the installed copy stays
        (src / "wiki1m_for_simcse.txt").write_text("tampered\n")
        with pytest.raises(SparseCSEError, match="does not match"):
            fetch(dest, base_url=url, progress=False)
        assert (dest / "wiki" / "wiki1m_for_simcse.txt").read_text().startswith("first")
        r = run_cli("data", "fetch", "--data-dir", str(tmp_path / "d2"), "--base-url", url + "/missing", "--quiet")
        assert r.returncode == 2 and "download failed" in r.stderr
    finally:
        srv.shutdown()


@pytest.mark.parametrize("member", ["../evil.txt", "senteval/../../evil2.txt", "link:senteval/STS/ln"])
def test_data_fetch_refuses_an_archive_that_writes_outside_the_data_dir(tmp_path, member):
    from sparsecse.core.fetch import fetch

    src = tmp_path / "srv"
    src.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("senteval/STS/STSBenchmark/sts-test.csv", member):
            info = tarfile.TarInfo(name.removeprefix("link:"))
            if name.startswith("link:"):  # a symlink pointing out of the tree
                info.type, info.linkname = tarfile.SYMTYPE, "../../../../outside"
                tf.addfile(info)
                continue
            info.size = 4
            tf.addfile(info, io.BytesIO(b"x\ty\n"))
    (src / "senteval.tar").write_bytes(buf.getvalue())
    (src / "wiki1m_for_simcse.txt").write_text("first sentence\n")
    srv = _serve(src)
    try:
        dest = tmp_path / "a" / "data"
        with pytest.raises(SparseCSEError, match="archive refused.*nothing was installed"):
            fetch(dest, base_url=f"http://127.0.0.1:{srv.server_address[1]}", progress=False)
        r = run_cli("data", "fetch", "--data-dir", str(dest), "--base-url",
                    f"http://127.0.0.1:{srv.server_address[1]}", "--quiet")
        assert r.returncode == 2 and "archive refused" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        srv.shutdown()
    assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil2.txt").exists()
    assert not (dest / "senteval").exists() and not (dest / "SHA256SUMS").exists()
    assert [p.name for p in dest.iterdir()] == []  # the staging dir is gone too


def test_scores_file_with_other_columns_is_refused_in_one_line(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "scores.parquet"
    table = pa.table({"batch": [0], "unit": [0]}).replace_schema_metadata(
        {"sparsecse": json.dumps({"layers": 1, "heads": 1, "intermediate": 1, "num_batches": 1})})
    pq.write_table(table, bad)
    r = run_cli("prune", "--pretrained", "minilm", "--scores", str(bad), "--sparsity", "0.1", "--lam", "0.5",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "not a sparsecse scores file (missing layer, index, g_align, g_uniform)" in r.stderr
