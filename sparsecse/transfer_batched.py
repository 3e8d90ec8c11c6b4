"""SimCSE's transfer protocol with every classifier of a task trained at once (issue 26).

The sequential protocol (`transfer.TorchLogReg`, SentEval's PyTorch classifier with nhid 0) fits hundreds of tiny
logistic regressions one after another: for a 10-fold task with 4 weight decays, 10 × (10 × 4) inner fits and 10
final ones. Each fit is a linear model over the same embeddings, so here they are one tensor program: a batch of
weight matrices (fits × classes × dim), each fit with its own rows, weight decay, Adam state and early-stopping
counter, and the same mini-batch schedule as its sequential twin (its own generator seeded as SentEval's; the same
initial weights, the same permutation every epoch). A fit that has stopped early stops updating; the batch goes on
until every fit has stopped. Gradients are written out (softmax cross-entropy), Adam is torch's own update rule.

`cv_accuracy`, `dev_test_accuracy` and `train_test_scores` mirror `transfer.py`'s and return the same figures
(and the chosen regularisers), in two batched phases each: the fits that choose the regulariser, then the final
fits at the chosen ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .transfer import L2_GRID, SEED


@dataclass(frozen=True)
class Fit:
    """One classifier: the rows it trains on (in its order), the rows it early-stops on, its weight decay."""

    train: np.ndarray
    val: np.ndarray
    l2: float


def fit_with_split(rows: np.ndarray, l2: float, val: np.ndarray | None = None, seed: int = SEED,
                   validation_split: float = 0.05) -> Fit:
    """A Fit as TorchLogReg.fit builds it: with no validation rows, a seeded `validation_split` of the training rows
    is held out (and the rest kept in that permuted order)."""
    if val is not None:
        return Fit(np.asarray(rows), np.asarray(val), l2)
    perm = np.random.default_rng(seed).permutation(len(rows))
    n_dev = int(validation_split * len(rows))
    return Fit(np.asarray(rows)[perm[n_dev:]], np.asarray(rows)[perm[:n_dev]], l2)


def _pad(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fits × longest) row indices padded with 0, and the mask of the real ones."""
    n = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for f, r in enumerate(rows):
        idx[f, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[f, :len(r)] = True
    return idx, mask


class _Adam:
    """torch.optim.Adam's update (L2 added to the gradient), one state per fit; fits outside `active` keep theirs."""

    def __init__(self, params: list[torch.Tensor], l2: torch.Tensor, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.l2, self.lr, self.b1, self.b2, self.eps = params, l2, lr, *betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = torch.zeros(len(l2), dtype=torch.float64)

    def step(self, grads: list[torch.Tensor], active: torch.Tensor) -> None:
        self.t += active.double()
        bc1 = (1 - self.b1 ** self.t).clamp_min(1e-30)
        bc2 = (1 - self.b2 ** self.t).clamp_min(1e-30)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            a = active.view(shape)
            g = g + self.l2.view(shape).to(p.dtype) * p
            m.copy_(torch.where(a, m.lerp(g, 1 - self.b1), m))
            v.copy_(torch.where(a, v * self.b2 + (1 - self.b2) * g * g, v))
            denom = v.sqrt() / bc2.sqrt().view(shape).to(p.dtype) + self.eps
            upd = (self.lr / bc1).view(shape).to(p.dtype) * m / denom
            p.sub_(torch.where(a, upd, torch.zeros_like(upd)))


def _accuracy(E: torch.Tensor, y: torch.Tensor, W: torch.Tensor, B: torch.Tensor, idx: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """Accuracy of every fit on its own rows (fits × rows padded)."""
    logits = torch.bmm(E[idx], W.transpose(1, 2)) + B[:, None, :]
    hit = (logits.argmax(-1) == y[idx]) & mask
    return hit.sum(1).double() / mask.sum(1).clamp_min(1).double()


def train_fits(E: np.ndarray, y: np.ndarray, fits: list[Fit], n_classes: int, batch_size: int = 64,
               tenacity: int = 5, epoch_size: int = 4, max_epoch: int = 200, seed: int = SEED,
               device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Every fit's best-validation (weights, biases): (fits × classes × dim, fits × classes), as TorchLogReg would
    have ended each of them. `y` holds class indices 0 … n_classes − 1."""
    Et = torch.as_tensor(E, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y, dtype=torch.long, device=device)
    F, D = len(fits), Et.shape[1]
    gens = [torch.Generator().manual_seed(seed) for _ in fits]
    W, B = torch.empty(F, n_classes, D), torch.empty(F, n_classes)
    bound = 1 / np.sqrt(D)
    for f, g in enumerate(gens):  # the seeded init TorchLogReg draws, in its order
        W[f].uniform_(-bound, bound, generator=g)
        B[f].uniform_(-bound, bound, generator=g)
    W, B = W.to(device), B.to(device)
    run = _Run(Et, yt, fits, gens, torch.zeros(F, dtype=torch.bool, device=device), W, B,
               _Adam([W, B], torch.tensor([f.l2 for f in fits], device=device)), _group_size(fits))
    done = run.done
    vidx, vmask = (t.to(device) for t in _pad([f.val for f in fits]))
    best_W, best_B = W.clone(), B.clone()
    best_acc = torch.full((F,), -1.0, dtype=torch.float64, device=device)
    stale = torch.zeros(F, dtype=torch.long, device=device)
    epoch = 0
    while epoch <= max_epoch and not bool(done.all()):
        for _ in range(epoch_size):
            _epoch(run, batch_size)
        epoch += epoch_size
        acc = _accuracy(Et, yt, W, B, vidx, vmask)
        better = (acc > best_acc) & ~done
        best_W[better], best_B[better], best_acc[better] = W[better], B[better], acc[better]
        worse = ~better & ~done
        done |= worse & (stale >= tenacity)
        stale += (worse & ~done).long()
    return best_W, best_B


@dataclass
class _Run:
    """What every epoch of `train_fits` updates: embeddings, labels, the fits with their generators, which have
    stopped, the weights and their optimiser."""

    E: torch.Tensor
    y: torch.Tensor
    fits: list
    gens: list
    done: torch.Tensor
    W: torch.Tensor
    B: torch.Tensor
    opt: _Adam
    group: int = 1  # consecutive fits that train on the same rows (a fold's weight decays): one gather for them


def _group_size(fits: list[Fit]) -> int:
    """R when the fits come in consecutive runs of R with the same training rows (the regulariser grid of each
    fold), else 1. Fits with the same rows draw the same permutations (same seed, same size): their batches are
    the same rows, gathered once."""
    for r in (len(L2_GRID), 1):
        if len(fits) % r == 0 and all(np.array_equal(fits[i].train, fits[i - i % r].train) for i in range(len(fits))):
            return r
    return 1


def _epoch(run: _Run, batch_size: int) -> None:
    """One epoch of every fit still training: its own permutation (the same for a group's fits), its batches of
    `batch_size` rows."""
    Et, yt, fits, W, B, R, device = run.E, run.y, run.fits, run.W, run.B, run.group, run.W.device
    live = [f for f in range(len(fits)) if not bool(run.done[f])]
    perms = {f: torch.randperm(len(fits[f].train), generator=run.gens[f]).numpy() for f in live}
    groups = sorted({f // R for f in live})
    order = [fits[g * R].train[perms[next(f for f in range(g * R, g * R + R) if f in perms)]] for g in groups]
    idx, mask = (t.to(device) for t in _pad(order))
    G, C, D = len(fits) // R, W.shape[1], W.shape[2]
    rows = torch.zeros(G, idx.shape[1], dtype=torch.long, device=device)
    valid = torch.zeros(G, idx.shape[1], dtype=torch.bool, device=device)
    rows[groups], valid[groups] = idx, mask
    for start in range(0, idx.shape[1], batch_size):
        r, m = rows[:, start:start + batch_size], valid[:, start:start + batch_size]
        active = m.any(1).repeat_interleave(R) & ~run.done
        X = Et[r]  # groups × batch × dim
        logits = torch.einsum("gbd,grcd->grbc", X, W.view(G, R, C, D)) + B.view(G, R, 1, C)
        p = torch.softmax(logits, -1) - torch.nn.functional.one_hot(yt[r], C).to(logits.dtype)[:, None]
        p = p * (m / m.sum(1, keepdim=True).clamp_min(1))[:, None, :, None]  # mean over each fit's own rows
        grads = [torch.einsum("grbc,gbd->grcd", p, X).reshape(-1, C, D), p.sum(2).reshape(-1, C)]
        run.opt.step(grads, active)


def _predict(E: np.ndarray, W: torch.Tensor, B: torch.Tensor, rows: list[np.ndarray]) -> list[np.ndarray]:
    Et = torch.as_tensor(E, dtype=torch.float32, device=W.device)
    with torch.no_grad():
        return [(Et[torch.as_tensor(r, device=W.device)] @ W[f].T + B[f]).argmax(1).cpu().numpy()
                for f, r in enumerate(rows)]


def _classes(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = np.unique(y)
    return classes, np.searchsorted(classes, y)


def _inner(tr: np.ndarray, y: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    return [(tr[a], tr[b]) for a, b in StratifiedKFold(n_splits=k, shuffle=True, random_state=SEED).split(tr, y[tr])]


def choose_regs(E, yi, n_classes, parts: list[np.ndarray], k: int, device: str = "cpu") -> list[float]:
    """For each training part, the weight decay with the best mean accuracy over its stratified k-fold (every part
    × fold × weight decay trained together); ties go to the first, as np.argmax does."""
    fits, where = [], []
    for p, tr in enumerate(parts):
        for a, b in _inner(tr, yi, k):
            for j, l2 in enumerate(L2_GRID):
                fits.append(Fit(a, b, l2))
                where.append((p, j))
    W, B = train_fits(E, yi, fits, n_classes, device=device)
    accs = np.zeros((len(parts), len(L2_GRID)))
    for (p, j), pred, fit in zip(where, _predict(E, W, B, [f.val for f in fits]), fits):
        accs[p, j] += (pred == yi[fit.val]).mean() / k
    return [float(L2_GRID[int(np.argmax(a))]) for a in accs]


def cv_accuracy(X: np.ndarray, y: np.ndarray, k: int = 10, inner_k: int = 10, device: str = "cpu"
                ) -> tuple[float, list[float]]:
    """transfer.cv_accuracy(classifier="pytorch"), batched: (accuracy ×100, the weight decay of each outer fold)."""
    from sklearn.model_selection import StratifiedKFold

    classes, yi = _classes(y)
    outer = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=SEED).split(X, y))
    regs = choose_regs(X, yi, len(classes), [tr for tr, _ in outer], inner_k, device)
    fits = [fit_with_split(tr, l2) for (tr, _), l2 in zip(outer, regs)]
    W, B = train_fits(X, yi, fits, len(classes), device=device)
    preds = _predict(X, W, B, [te for _, te in outer])
    return 100.0 * float(np.mean([(p == yi[te]).mean() for p, (_, te) in zip(preds, outer)])), regs


def dev_test_accuracy(Xtr, ytr, Xdev, ydev, Xte, yte, device: str = "cpu") -> tuple[float, float]:
    """transfer.dev_test_accuracy, batched: the four weight decays early-stop and are chosen on dev; the chosen
    fit is the final model (the sequential path refits the same seeded model). (test accuracy ×100, weight decay)."""
    E = np.concatenate([Xtr, Xdev, Xte])
    classes, yi = _classes(np.concatenate([ytr, ydev, yte]))
    tr, dv = np.arange(len(Xtr)), np.arange(len(Xtr), len(Xtr) + len(Xdev))
    te = np.arange(len(Xtr) + len(Xdev), len(E))
    fits = [Fit(tr, dv, l2) for l2 in L2_GRID]
    W, B = train_fits(E, yi, fits, len(classes), device=device)
    devs = [(p == yi[dv]).mean() for p in _predict(E, W, B, [dv] * len(fits))]
    j = int(np.argmax(devs))
    return 100.0 * float((_predict(E, W[j:j + 1], B[j:j + 1], [te])[0] == yi[te]).mean()), float(L2_GRID[j])


def train_test_scores(Xtr, ytr, Xte, yte, k: int = 10, device: str = "cpu") -> tuple[float, float, float]:
    """transfer.train_test_scores, batched: (accuracy ×100, F1 ×100 for binary labels, the chosen weight decay)."""
    from sklearn.metrics import f1_score

    E = np.concatenate([Xtr, Xte])
    classes, yi = _classes(np.concatenate([ytr, yte]))
    tr, te = np.arange(len(Xtr)), np.arange(len(Xtr), len(E))
    reg = choose_regs(E, yi, len(classes), [tr], k, device)[0]
    W, B = train_fits(E, yi, [fit_with_split(tr, reg)], len(classes), device=device)
    pred = classes[_predict(E, W, B, [te])[0]]
    f1 = 100.0 * f1_score(yte, pred) if len(classes) == 2 else float("nan")
    return 100.0 * float((pred == yte).mean()), float(f1), reg
