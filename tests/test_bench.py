"""`python -m benchmarks.bench` rows run end to end at toy sizes (the real rows are in BENCHMARKS.md, not in CI's pass/fail):
every arm runs, figures are finite and positive, and the peers compute the same STS numbers as ours."""

from __future__ import annotations

import math

import pytest

from benchmarks import bench
from sparsecse import SparseCSEError

pytestmark = pytest.mark.slow


def _md(r):
    return bench.markdown({**r, "machine": "test machine", "date": "today", "reps": 1, "warmup": 0})


def test_bench_train_three_arms(tiny_data_dir):
    r = bench.bench_train(tiny_data_dir, reps=1, steps=1, batch=4, max_len=16, warmup=0)
    assert len(r["ours_s"]) == len(r["ours_before_s"]) == len(r["peer_s"]) == 1
    for k in ("ours_sent_s", "before_sent_s", "peer_sent_s", "ratio", "speedup_vs_before", "ours_model_gflops",
              "matmul_peak_gflops"):
        assert math.isfinite(r[k]) and r[k] > 0, k
    assert 0 <= r["padding_fraction"] < 1 and 0 < r["mfu"] < 1  # no arm can beat the measured matmul peak
    assert f"| {r['ours_sent_s']:.1f} | {r['before_sent_s']:.1f} | {r['peer_sent_s']:.1f} | {r['ratio']:.2f}× |" in _md(r)


def test_bench_train_bf16_autocast_runs_every_arm(tiny_data_dir):
    r = bench.bench_train(tiny_data_dir, reps=1, steps=1, batch=4, max_len=16, precision="bf16", warmup=0, peak_n=256)
    assert r["precision"] == "bf16" and r["device"] == "cpu"
    for k in ("ours_sent_s", "before_sent_s", "peer_sent_s", "mfu"):
        assert math.isfinite(r[k]) and r[k] > 0, k


def test_bench_eval_peer_and_ours_agree(tiny_data_dir):
    r = bench.bench_eval(tiny_data_dir, reps=1, tasks=("STSBenchmark", "SICKRelatedness"), before=True)
    assert r["max_abs_diff"] < 0.02  # the protocol requirement: same numbers to ±0.02
    assert set(r["ours"]) == set(r["peer"]) == {"STSBenchmark", "SICKRelatedness", "avg"}
    assert r["ours_s"] > 0 and r["peer_s"] > 0 and r["before_s"] > 0
    # the work accounting: the peer encodes both sides of every pair, padded; ours each unique sentence, unpadded
    assert r["encodes_ours"] <= r["encodes_peer"] and r["tokens_ours"] < r["token_slots_peer"]
    assert r["work_ratio"] > 1 and r["flops_peer"] > r["flops_ours"] > 0
    assert 0 < r["peer_executed_gflops"] and 0 < r["matmul_peak_gflops"]
    assert f"| STSBenchmark SICKRelatedness | {r['ours_s']:.1f} s | {r['before_s']:.1f} s | {r['peer_s']:.1f} s |" in _md(r)


def test_bench_eval_onnx_arm(tiny_data_dir, tiny_model_dir, tmp_path):
    """The eval row's ONNX arm: our evaluator on an ONNX export through ONNX Runtime, timed beside the peer."""
    from sparsecse.ops.export import export_model
    from sparsecse.method.model import load_encoder

    pdir = export_model(load_encoder(str(tiny_model_dir)), tmp_path / "e", onnx=True, quantize=False) / "pruned"
    r = bench.bench_eval(tiny_data_dir, reps=1, tasks=("STSBenchmark",), warmup=0, onnx=(str(pdir), "onnx/model.onnx"))
    assert r["onnx_s"] > 0 and r["onnx_ratio"] == pytest.approx(r["peer_s"] / r["onnx_s"])
    assert set(r["onnx"]) == {"STSBenchmark", "avg"} and f"{r['onnx_ratio']:.2f}×** the peer" in _md(r)


def test_bench_inference_every_deployment_step_against_the_sentence_transformers_baseline(tiny_data_dir, tmp_path,
                                                                                          tiny_model_dir):
    r = bench.bench_inference(tiny_data_dir, reps=1, sparsities=(0.3,), n=16, work=tmp_path, warmup=0,
                              model=str(tiny_model_dir), score_pairs=24)
    (pt,) = r["points"]
    assert pt["params_pruned"] < pt["params_dense"] and set(pt["sets"]) == set(bench.SENTENCE_SETS)
    for v in pt["sets"].values():
        assert set(v["sent_s"]) == set(bench.INFERENCE_ARMS) - {"pruned_padded", "st_pruned_padded",
                                                                 "ort_fp32_padded", "ort_int8_padded"}
        assert v["speedup"]["st_dense"] == 1.0
        assert all(math.isfinite(x) and x > 0 for x in v["speedup"].values())
    assert pt["onnx_mb"]["onnx/model_qint8.onnx"] < pt["onnx_mb"]["onnx/model.onnx"]
    # (the tiny random model's STS cosines are nearly tied, so its Spearman is no equality check; the embeddings are)
    assert pt["min_cosine"]["ort_fp32"] >= 0.9999 and set(pt["stsb"]) == {"st_dense", "pruned", "ort_fp32", "ort_int8"}
    md = _md(r)
    wiki = pt["sets"]["wiki"]
    assert f"| 30.0 % | wiki | {pt['params_pruned'] / 1e6:.1f} M / {pt['params_dense'] / 1e6:.1f} M |" in md
    assert "pruned ONNX int8 (fused)" in md and f"({wiki['speedup']['ort_int8']:.2f}×)" in md
    assert f"{pt['min_cosine']['ort_fp32']:.5f}" in md


def test_bench_inference_times_a_family_from_its_shape_with_random_weights(tiny_data_dir, tmp_path):
    """`--model random:FAMILY`: the family's encoder with random weights and the MiniLM tokenizer goes through every
    arm (here ModernBERT, tiny, with `before`'s padded-forward arm); no STS-B (random weights score nothing), the ONNX files still checked against the
    torch export; a spec naming no family is one line."""
    r = bench.bench_inference(tiny_data_dir, reps=1, sparsities=(0.3,), n=8, work=tmp_path, warmup=0,
                              model="random:modernbert:tiny", score_pairs=16, before=True)
    (pt,) = r["points"]
    assert set(pt["sets"]["wiki"]["sent_s"]) == set(bench.INFERENCE_ARMS)  # with the padded forward's arm
    assert '"model_type": "modernbert"' in (tmp_path / "random-modernbert-tiny" / "config.json").read_text()
    assert "stsb" not in pt and pt["min_cosine"]["ort_fp32"] >= 0.9999 and pt["params_pruned"] < pt["params_dense"]
    md = _md(r)
    assert "model random:modernbert:tiny" in md and "STS-B" not in md and "ours, pruned torch, padded forward" in md
    assert f"| 30.0 % | {pt['min_cosine']['ort_fp32']:.5f} / {pt['min_cosine']['ort_int8']:.4f} |" in md
    with pytest.raises(SparseCSEError, match="random:FAMILY or random:FAMILY:tiny"):
        bench.random_family_model("random:gpt2", tmp_path / "x")


def test_flop_accounting_matches_torch_flop_counter(tiny):
    """fwd_flops / train_flops_per_step against what torch's FlopCounterMode counts on a real forward/backward of
    the tiny BERT (all tokens real, so padded = real)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny.backbone.config
    B, T = 3, 7
    ids = torch.randint(5, cfg.vocab_size, (B, T))
    att = torch.ones(B, T, dtype=torch.long)
    tiny.packed = False  # the padded forward: every slot computed, as the formula counts
    tiny.backbone.config._attn_implementation = "eager"  # attention as matmuls the counter sees (CPU SDPA: not)
    tiny.eval()
    with FlopCounterMode(display=False) as fwd:
        tiny.backbone(input_ids=ids, attention_mask=att)
    assert bench.fwd_flops(cfg, B * T, T) == pytest.approx(fwd.get_total_flops(), rel=1e-6)
    tiny.train()
    with FlopCounterMode(display=False) as step:
        tiny.backbone(input_ids=ids, attention_mask=att).last_hidden_state.sum().backward()
    # backward ≈ 2× forward (the embedding's gradient is not a matmul; the first layer's input gradient is)
    assert bench.train_flops_per_step(cfg, B * T, T) == pytest.approx(step.get_total_flops(), rel=0.05)
