"""Integration on the packaged all-MiniLM-L6-v2 and the real data (slow: ~2 minutes in all)."""

import json

import pytest
import torch

from sparsecse.method.evaluate import evaluate_sts
from sparsecse.method.model import load_encoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm", pooler="avg")


def test_stsb_test_reproduces_senteval_reference(minilm, data_dir):
    """SentEval protocol reference on these files: all-MiniLM-L6-v2, mean pooling, STS-B test 82.03."""
    r = evaluate_sts(minilm, data_dir, tasks=("STSBenchmark",), pooler="avg")
    assert abs(r["STSBenchmark"] - 82.03) <= 0.02


def test_cli_eval_writes_json_and_table(data_dir, tmp_path):
    from test_data_cli import run_cli

    out = tmp_path / "r.json"
    r = run_cli("eval", "--model", "minilm", "--pooler", "avg", "--tasks", "STS16", "--data-dir", str(data_dir),
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"STS16", "avg"} and res["avg"] == res["STS16"]
    assert "STS16" in r.stdout and "Avg." in r.stdout


def test_a_few_simcse_steps_lower_the_loss(data_dir, tmp_path):
    """Same fixed batch, dropout views: the InfoNCE loss falls after a few optimizer steps."""
    from sparsecse.method.losses import info_nce

    torch.manual_seed(0)
    enc = load_encoder("minilm", pooler="cls").train()
    lines = (data_dir / "wiki" / "wiki1m_sample.txt").read_text(encoding="utf-8").splitlines()[:32]
    tok = enc.tokenize(lines, max_len=32)
    ids, att = tok["input_ids"].repeat(2, 1), tok["attention_mask"].repeat(2, 1)
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-5)
    losses = []
    for _ in range(4):
        z = enc(ids, att)
        loss = info_nce(z[:32], z[32:], 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        torch.manual_seed(1)
        z = enc(ids, att)
        after = info_nce(z[:32], z[32:], 0.05).item()
    assert after < losses[0]


def test_thirty_percent_physical_export_has_thirty_percent_fewer_layer_params(tmp_path):
    import numpy as np

    from sparsecse.method.prune import physical_prune
    from sparsecse.method.prune import rewind, select_masks

    rng = np.random.default_rng(0)
    enc = rewind(load_encoder("minilm"), *select_masks(rng.random((6, 12)), rng.random((6, 1536)), 0.3))
    pruned = physical_prune(enc)
    dense_n = sum(p.numel() for p in enc.backbone.encoder.layer.parameters())
    pruned_n = sum(p.numel() for p in pruned.encoder.layer.parameters())
    assert 0.28 <= 1 - pruned_n / dense_n <= 0.31


def test_one_transfer_task_on_the_real_backbone(minilm, data_dir):
    from sparsecse.method.transfer import evaluate_transfer

    r = evaluate_transfer(minilm, data_dir, tasks=("TREC",), pooler="avg", folds=(10, 3))  # 3 inner folds: CI time
    assert 70.0 < r["TREC"] <= 100.0 and r["avg"] == r["TREC"]
