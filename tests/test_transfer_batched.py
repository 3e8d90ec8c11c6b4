"""Issue 26: SimCSE's transfer protocol with every fit of a task trained at once equals the sequential protocol —
the same weights fit for fit, the same chosen weight decays and accuracies — at toy size (the real-backbone check
on MR is in tests/test_real_backbone.py)."""

from __future__ import annotations

import numpy as np
import pytest

import transfer_oracle as oracle
from sparsecse.method import classifier as tb
from sparsecse.method import transfer as seq


def _data(n=240, d=12, classes=2, noise=1.5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    score = X @ rng.normal(size=d) + rng.normal(scale=noise, size=n)
    y = (score > 0).astype(int) if classes == 2 else np.digitize(score, np.quantile(score, [1 / 3, 2 / 3]))
    return X, y


def test_each_fit_ends_with_the_weights_its_sequential_twin_ends_with():
    """Fits of different sizes, weight decays and a held-out 5 % split, trained together — two of them on the same
    rows (one group, not adjacent in the list; the other groups have an empty member), groups leaving the batch at
    different epochs: each one's best weights are TorchLogReg's to float precision (same init, same permutation
    every epoch, same early stop)."""
    X, y = _data(n=260)
    tr, va = np.arange(200), np.arange(200, 260)
    fits = [tb.Fit(tr, va, 1e-5), tb.Fit(tr[:130], va, 1e-2), tb.fit_with_split(tr, 1e-3), tb.Fit(tr, va, 1e-2)]
    groups = tb._group(fits)
    assert groups.slot == [(0, 0), (1, 0), (2, 0), (0, 1)] and groups.l2.shape == (3, 2)
    W, B = tb.train_fits(X, y, fits, 2)
    twins = [oracle.TorchLogReg(1e-5).fit(X[tr], y[tr], (X[va], y[va])),
             oracle.TorchLogReg(1e-2).fit(X[tr[:130]], y[tr[:130]], (X[va], y[va])),
             oracle.TorchLogReg(1e-3).fit(X[tr], y[tr]),
             oracle.TorchLogReg(1e-2).fit(X[tr], y[tr], (X[va], y[va]))]
    for f, m in enumerate(twins):
        assert np.abs(m.model.weight.detach().numpy() - W[f].numpy()).max() < 1e-5, f
        assert np.abs(m.model.bias.detach().numpy() - B[f].numpy()).max() < 1e-5, f


def test_argmax_over_classes_is_torch_argmax_ties_included():
    import torch

    for C in (2, 3, 6):
        L = torch.randn(3, 4, C, 50)
        L[0, 0, :, :5] = 1.0  # every class tied: the first wins
        L[1, 2, 1:, 7] = L[1, 2, 1:, 7].max() + 1  # a tie between later classes
        assert torch.equal(tb._argmax_classes(L), L.argmax(2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_three_protocols_give_the_sequential_figures_and_choices(seed):
    from sklearn.model_selection import StratifiedKFold

    X, y = _data(seed=seed, noise=3.0)
    acc, regs = tb.cv_accuracy(X, y, 3, 3)
    assert acc == pytest.approx(seq.cv_accuracy(X, y, 3, 3, oracle.PYTORCH_SEQUENTIAL), abs=1e-9)
    outer = StratifiedKFold(n_splits=3, shuffle=True, random_state=tb.SEED).split(X, y)
    assert regs == [seq.choose_c(X[tr], y[tr], 3, oracle.PYTORCH_SEQUENTIAL) for tr, _ in outer]
    X3, y3 = _data(seed=seed, classes=3, noise=1.0)
    got = tb.train_test_scores(X3[:180], y3[:180], X3[180:], y3[180:], 3)
    want = seq.train_test_scores(X3[:180], y3[:180], X3[180:], y3[180:], 3, oracle.PYTORCH_SEQUENTIAL)
    assert got[0] == pytest.approx(want[0], abs=1e-9) and np.isnan(got[1]) and np.isnan(want[1])
    got = tb.dev_test_accuracy(X[:120], y[:120], X[120:170], y[120:170], X[170:], y[170:])
    assert got[0] == pytest.approx(seq.dev_test_accuracy(X[:120], y[:120], X[120:170], y[120:170], X[170:], y[170:],
                                                         oracle.PYTORCH_SEQUENTIAL), abs=1e-9)


def test_evaluate_transfer_runs_batched_by_default_and_sequential_on_request(tiny_model_dir, data_dir):
    from sparsecse.method.model import load_encoder

    enc = load_encoder(str(tiny_model_dir), pooler="cls_before_pooler")
    kw = dict(tasks=("MR", "TREC"), folds=(3, 3), max_examples=120)
    batched = seq.evaluate_transfer(enc, data_dir, **kw)
    sequential = seq.evaluate_transfer(enc, data_dir, classifier=oracle.PYTORCH_SEQUENTIAL, **kw)
    for t in ("MR", "TREC", "avg"):
        assert batched[t] == pytest.approx(sequential[t], abs=1e-9), t
    from sparsecse import SparseCSEError

    with pytest.raises(SparseCSEError, match="transfer classifier"):
        seq.evaluate_transfer(enc, data_dir, classifier="svm", **kw)


def test_bf16_encoding_is_autocast_and_close_to_fp32(tiny_model_dir, data_dir):
    """`eval --precision bf16`'s encoder pass: bfloat16 autocast (other embeddings than fp32's, returned as fp32),
    each within cosine 0.99 of its fp32 twin."""
    import torch

    from sparsecse.method.evaluate import encode
    from sparsecse.method.model import load_encoder

    enc = load_encoder(str(tiny_model_dir), pooler="cls_before_pooler")
    sents = seq.task_sentences(seq.load_tasks(data_dir, ("MR",), 40))
    a, b = (encode(enc, sents, pooler="cls_before_pooler", precision=p) for p in ("fp32", "bf16"))
    A, B = (torch.stack([e[s] for s in sents]) for e in (a, b))
    assert B.dtype == torch.float32 and not torch.equal(A, B)
    assert torch.nn.functional.cosine_similarity(A, B).min() > 0.99


@pytest.mark.slow
def test_on_minilm_embeddings_mr_gives_the_sequential_accuracy_and_regularisers(data_dir):
    """The real backbone on MR (400 examples, SentEval's 10 × 10 folds): the batched protocol's accuracy equals the
    sequential one's within 0.5 and picks the same weight decay in at least 90 % of the outer folds."""
    from sklearn.model_selection import StratifiedKFold

    from sparsecse.method.evaluate import encode
    from sparsecse.method.model import default_model_path, load_encoder

    loaded = seq.load_tasks(data_dir, ("MR",), 400)
    enc = load_encoder(default_model_path(), pooler="cls_before_pooler")
    emb = encode(enc, seq.task_sentences(loaded), batch_size=128, pooler="cls_before_pooler")
    xs, y = loaded["MR"].data["all"]
    X = np.stack([emb[s].numpy() for s in xs]).astype(np.float64)
    acc, regs = tb.cv_accuracy(X, y, 10, 10)
    assert abs(acc - seq.cv_accuracy(X, y, 10, 10, oracle.PYTORCH_SEQUENTIAL)) <= 0.5
    outer = StratifiedKFold(n_splits=10, shuffle=True, random_state=tb.SEED).split(X, y)
    same = [r == seq.choose_c(X[tr], y[tr], 10, oracle.PYTORCH_SEQUENTIAL) for r, (tr, _) in zip(regs, outer)]
    assert sum(same) >= 9, same
