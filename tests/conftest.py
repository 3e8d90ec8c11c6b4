"""Shared fixtures: a tiny random BERT built in code (hidden 32, 2 layers, 4 heads, FFN 37), saved once per
session; tests get fresh copies. Real-data tests read SPARSECSE_DATA_DIR (CI sets it to ../shared/data)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# The files that take longest, longest first (measured in a full parallel run): pytest-xdist hands out whole files
# in collection order (`--dist loadfile --no-loadscope-reorder`), so the long ones start at once and the many short
# files fill both workers at the end — instead of a Ray-heavy file starting last and running alone.
LONGEST_FIRST = ("test_ray_search.py", "test_faults.py", "test_ray.py", "test_bench_cli.py", "test_cluster.py",
                 "test_faults_gpu.py", "test_bad_inputs.py", "test_transfer_batched.py", "test_transfer.py",
                 "test_onnx.py", "test_families.py")


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker computes with its share of the cores (1 each on 2 cores): torch's and ONNX
    Runtime's pools sized for the whole machine busy-wait against the other worker's (measured: the MiniLM MR
    transfer test took 351 s beside two busy processes with 2 threads, 95 s with 1). Subprocesses inherit it."""
    # Ray Train's controller looks at its workers every 2 s by default: each stage 1 of a test sweep (4 steps of a
    # tiny model) waited about 4 s on it. Polled faster here; the sweeps themselves run unchanged.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


def _data_dir() -> Path | None:
    for cand in (os.environ.get("SPARSECSE_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and Path(cand, "senteval").is_dir():
            return Path(cand).resolve()
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if d is None:
        pytest.fail("real-data tests need SPARSECSE_DATA_DIR pointing at the SentEval-layout data (../shared/data)")
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BertModel + the MiniLM tokenizer (packaged, or carried to a GPU machine), as an HF directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from benchmarks.gpu_check import tokenizer_source

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=128, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)
    model = BertModel(cfg, add_pooling_layer=False)
    d = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(tokenizer_source()).save_pretrained(d)
    return d


@pytest.fixture
def tiny(tiny_model_dir):
    from sparsecse.method.model import load_encoder

    return load_encoder(str(tiny_model_dir), pooler="cls_before_pooler").eval()


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, data_dir) -> Path:
    """A small SentEval-layout data dir: slices of the real files (fast tiny-model runs)."""
    d = tmp_path_factory.mktemp("data")
    src = data_dir / "senteval"
    for split, n in (("train", 200), ("dev", 120), ("test", 120)):
        p = d / "senteval" / "STS" / "STSBenchmark" / f"sts-{split}.csv"
        p.parent.mkdir(parents=True, exist_ok=True)
        lines = (src / "STS" / "STSBenchmark" / f"sts-{split}.csv").read_text(encoding="utf-8").splitlines()
        p.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    (d / "senteval" / "SICK").mkdir(parents=True)
    for name in ("SICK_test_annotated.txt", "SICK_trial.txt"):
        sick = (src / "SICK" / name).read_text(encoding="utf-8").splitlines()
        (d / "senteval" / "SICK" / name).write_text("\n".join(sick[:121]) + "\n", encoding="utf-8")
    for year in ("STS12", "STS13", "STS14", "STS15", "STS16"):  # every test set the clean selection data leaves out
        for f in (src / "STS" / f"{year}-en-test").glob("STS.*.txt"):
            p = d / "senteval" / "STS" / f"{year}-en-test" / f.name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("\n".join(f.read_text(encoding="utf-8").splitlines()[:40]) + "\n", encoding="utf-8")
    wiki = (data_dir / "wiki" / "wiki1m_sample.txt").read_text(encoding="utf-8").splitlines()
    (d / "wiki").mkdir()
    (d / "wiki" / "wiki1m_sample.txt").write_text("\n".join(wiki[:256]) + "\n", encoding="utf-8")
    return d


def make_batch(enc, sentences=("a man is playing a guitar .", "the cat sleeps", "stocks fell sharply on monday .")):
    b = enc.tokenize(list(sentences))
    return b["input_ids"], b["attention_mask"]


def process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process, from /proc."""
    import contextlib

    procs = {}
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            args = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            procs[int(d.name)] = (int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), args)
    return procs


def kill_processes_mentioning(marker: str) -> int:
    """SIGKILL every process whose command line contains `marker` (a Ray temp dir), and their descendants.

    Tests stop the Ray instances they started this way, never with `ray stop`, which would also kill any other
    Ray running on the machine (a user's sweep, a parallel test run)."""
    import contextlib
    import os
    import signal

    procs = process_table()
    doomed = {pid for pid, (_, args) in procs.items() if marker in args and pid != os.getpid()}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in doomed} - doomed - {os.getpid()}
        doomed |= more
        grew = bool(more)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(doomed)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    """A local S3 endpoint (moto's standalone server on 127.0.0.1) with one bucket; its variables are set in this
    process for the session (pyarrow, Ray and boto3 read AWS_ENDPOINT_URL) and handed to subprocesses via .env."""
    import socket
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None and time.time() < deadline, "moto_server did not start"
            time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket="sparsecse-test")
        yield SimpleNamespace(env=env, bucket="sparsecse-test", port=port)
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_keys(prefix: str) -> dict[str, float]:
    """{key: last-modified} of every object under s3://sparsecse-test/<prefix>."""
    import boto3

    out, kw = {}, {"Bucket": "sparsecse-test", "Prefix": prefix}
    while True:
        page = boto3.client("s3").list_objects_v2(**kw)
        out.update({o["Key"]: o["LastModified"].timestamp() for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")})  # directory markers some clients write are not files
        if not page.get("IsTruncated"):
            return out
        kw["ContinuationToken"] = page["NextContinuationToken"]


RAY_BIN = str(Path(sys.executable).with_name("ray"))


def node_processes(manager_port: int) -> tuple[str, list[int]]:
    """The node id and the pids (raylet + its descendants) of the node whose raylet listens on manager_port."""
    procs = [(pid, ppid, args) for pid, (ppid, args) in process_table().items()]
    raylet = next((pid, args) for pid, _, args in procs
                  if "raylet/raylet" in args and f"--node_manager_port={manager_port} " in args)
    node_id = next(t.split("=", 1)[1] for t in raylet[1].split() if t.startswith("--node_id="))
    tree, grew = {raylet[0]}, True
    while grew:
        more = {pid for pid, ppid, _ in procs if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return node_id, sorted(tree)
