"""Pure math: InfoNCE, alignment/uniformity, Spearman and the 'all' aggregation, score combination, mask selection."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from sparsecse import SparseCSEError
from sparsecse.method.evaluate import aggregate_all, spearman
from sparsecse.method.losses import alignment, info_nce, uniformity
from sparsecse.method.prune import count_pruned, lowest_mask, select_masks
from sparsecse.method.score import combine


def test_info_nce_equals_hand_built_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    tau = 0.05
    loss = info_nce(z1, z2, tau)
    manual = 0.0
    for i in range(6):
        sims = torch.stack([F.cosine_similarity(z1[i], z2[j], dim=0) / tau for j in range(6)])
        manual += -(sims[i] - torch.logsumexp(sims, 0))
    assert torch.allclose(loss, manual / 6, atol=1e-5)


def test_alignment_and_uniformity_equal_brute_force():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    brute_a = sum(((xn[i] - yn[i]) ** 2).sum() for i in range(5)) / 5
    assert torch.allclose(alignment(x, y), brute_a, atol=1e-6)
    assert torch.allclose(alignment(x, y, log=True), brute_a.log(), atol=1e-6)
    terms = [torch.exp(-2 * ((xn[i] - xn[j]) ** 2).sum()) for i in range(5) for j in range(i + 1, 5)]
    assert torch.allclose(uniformity(x), torch.stack(terms).mean().log(), atol=1e-6)


def test_spearman_uses_average_ranks_for_ties_and_is_nan_for_a_constant_input():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: ρ = 4.5 / sqrt(4.5 · 5), worked by hand
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5), abs=1e-12)
    assert spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_all_aggregation_is_one_spearman_over_concatenated_subsets():
    rng = np.random.default_rng(1)
    sys = {k: rng.normal(size=n) for k, n in (("a", 30), ("b", 17), ("c", 44))}
    gold = {k: v + rng.normal(size=len(v)) for k, v in sys.items()}
    expected = stats.spearmanr(np.concatenate(list(sys.values())), np.concatenate(list(gold.values()))).correlation
    assert aggregate_all(sys, gold) == pytest.approx(expected, abs=1e-12)
    mean_of_subsets = np.mean([stats.spearmanr(sys[k], gold[k]).correlation for k in sys])
    assert aggregate_all(sys, gold) != pytest.approx(mean_of_subsets, abs=1e-6)


def test_combine_is_mean_abs_of_lambda_mix():
    rng = np.random.default_rng(2)
    ga, gu = rng.normal(size=(7, 3, 4)), rng.normal(size=(7, 3, 4))
    for lam in (0.0, 0.25, 0.5, 1.0):
        direct = np.mean([np.abs(lam * ga[b] + (1 - lam) * gu[b]) for b in range(7)], axis=0)
        assert np.allclose(combine(ga, gu, lam), direct)
    with pytest.raises(SparseCSEError):
        combine(ga, gu, 1.5)


@pytest.mark.parametrize("s,n,k", [(0.0, 72, 0), (0.02, 72, 1), (0.3, 72, 22), (0.5, 9216, 4608), (0.25, 2, 1)])
def test_exact_pruned_counts(s, n, k):
    assert count_pruned(s, n) == k
    m = lowest_mask(np.arange(n, dtype=float)[::-1].copy(), s)
    assert int((m == 0).sum()) == k
    assert bool((m[n - k:] == 0).all())  # the lowest scores are the last ones here


def test_ties_are_broken_by_index_and_selection_is_global_across_layers():
    heads = np.array([[1.0, 1.0, 5.0], [1.0, 9.0, 9.0]])
    hm, nm = select_masks(heads, np.array([[3.0, 1.0], [2.0, 4.0]]), 0.5)
    assert hm.tolist() == [[0, 0, 1], [0, 1, 1]]
    assert nm.tolist() == [[1, 0], [0, 1]]
    with pytest.raises(SparseCSEError):
        lowest_mask(heads, 1.0)


def test_info_nce_keeps_no_tensor_larger_than_the_similarity_matrix_or_the_batch():
    """Normalise-then-matmul: autograd saves (N, D) and (N, N) tensors, never the (N, N, D) a broadcast cosine
    similarity builds (440 MB of it for batch 64 × 2 views at bert-large's 1,024 dimensions in fp32)."""
    import torch

    n, d = 64, 384
    z1, z2 = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = info_nce(z1, z2, 0.05)
    loss.backward()
    assert saved and max(saved) <= max(n * n, n * d)
    ref = torch.nn.functional.cosine_similarity(z1.unsqueeze(1), z2.unsqueeze(0), dim=-1) / 0.05
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(ref, torch.arange(n)), atol=1e-5)


def test_precision_auto_is_bf16_with_tf32_on_cuda_and_fp32_elsewhere():
    """train.precision's default: bf16 autocast (TF32 for what stays fp32) on CUDA, plain fp32 on the CPU; a
    pinned fp32 turns TF32 off on CUDA so fp32 means fp32; a pinned bf16 stays bf16 anywhere. (Resolving touches
    only torch's TF32 switches, which exist without a GPU.)"""
    from sparsecse.core.config import load_config
    from sparsecse.method.train import resolve_precision

    assert load_config(None, []).train.precision == "auto"
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert resolve_precision("auto", "cpu") == "fp32"
        assert resolve_precision("auto", "cuda") == "bf16" and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        assert resolve_precision("fp32", "cuda:0") == "fp32" and not torch.backends.cuda.matmul.allow_tf32
        assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
