"""Shared fixtures: a tiny random BERT built in code (hidden 32, 2 layers, 4 heads, FFN 37), saved once per
session; tests get fresh copies. Real-data tests read SPARSECSE_DATA_DIR (CI sets it to ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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
    """A tiny random BertModel + the packaged MiniLM tokenizer, as an HF directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sparsecse.model import default_model_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=128, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)
    model = BertModel(cfg, add_pooling_layer=False)
    d = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(d)
    return d


@pytest.fixture
def tiny(tiny_model_dir):
    from sparsecse.model import load_encoder

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
    sick = (src / "SICK" / "SICK_test_annotated.txt").read_text(encoding="utf-8").splitlines()
    (d / "senteval" / "SICK").mkdir(parents=True)
    (d / "senteval" / "SICK" / "SICK_test_annotated.txt").write_text("\n".join(sick[:121]) + "\n", encoding="utf-8")
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
