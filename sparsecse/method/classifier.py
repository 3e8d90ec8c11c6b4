"""SimCSE's transfer protocol with every classifier of a task trained at once (issue 26).

The sequential protocol (SentEval's PyTorch classifier with nhid 0; its oracle is tests/transfer_oracle.py) fits hundreds of tiny
logistic regressions one after another: for a 10-fold task with 4 weight decays, 10 × (10 × 4) inner fits and 10
final ones. Each fit is a linear model over the same embeddings, so here they are one tensor program, with the same
mini-batch schedule as each fit's sequential twin (its own generator seeded as SentEval's: the same initial weights,
the same permutation every epoch), its own weight decay, Adam state (torch's update rule) and early stopping.

- Fits that train and early-stop on the same rows (a fold's weight decays) form a group: one gather of each batch,
  one (members·classes × dim + 1) matrix product; the bias is the last column.
- A group leaves the batch when all its fits have stopped (the live groups are compacted); a fit that stopped
  inside a live group keeps updating unseen, its best weights already kept apart.
- The gradient of the softmax cross-entropy is written out (mean over each group's own rows; only an epoch's last
  batches, where groups have different sizes, are masked per group).
- The final fits run in the same batch as the fits that choose their weight decay, at every weight decay
  (`choose_and_fit`), so a task is one pass, not two.

`cv_accuracy`, `dev_test_accuracy` and `train_test_scores` mirror `transfer.py`'s one-fit-at-a-time protocol and return the same figures
(and the chosen regularisers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

L2_GRID = tuple(10.0 ** t for t in range(-5, -1))  # weight decay (SentEval's usepytorch grid)
SEED = 1111  # SentEval's


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
    """(lists × longest) row indices padded with 0, and the mask of the real ones."""
    n = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for f, r in enumerate(rows):
        idx[f, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[f, :len(r)] = True
    return idx, mask


@dataclass
class _Groups:
    """The fits, grouped by the rows they train and early-stop on: a group's fits (its weight decays) draw the same
    init and the same permutation every epoch (same seed, same rows), so they share one gather of each batch."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    l2: np.ndarray  # (groups × members); a group with fewer fits than the widest has empty members (never read)
    slot: list[tuple[int, int]]  # each fit's (group, member), in the fits' order


def _group(fits: list[Fit]) -> _Groups:
    keys: dict[tuple[bytes, bytes], int] = {}
    train, val, members, slot = [], [], [], []
    for f in fits:
        key = (np.asarray(f.train, dtype=np.int64).tobytes(), np.asarray(f.val, dtype=np.int64).tobytes())
        if key not in keys:
            keys[key] = len(train)
            train.append(np.asarray(f.train))
            val.append(np.asarray(f.val))
            members.append([])
        g = keys[key]
        slot.append((g, len(members[g])))
        members[g].append(f.l2)
    l2 = np.zeros((len(train), max(len(m) for m in members)))
    for g, m in enumerate(members):
        l2[g, :len(m)] = m
    return _Groups(train, val, l2, slot)


@dataclass
class _Live:
    """The groups still training, compacted: their ids, generators, weights (groups × members·classes × dim + 1,
    the bias as the last column) and torch.optim.Adam's state (moments; steps per group, as a group's fits step
    together). Fits that have stopped inside a live group go on updating; their best weights were kept apart."""

    ids: torch.Tensor
    gens: list
    W: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    t: torch.Tensor
    l2: torch.Tensor  # (groups × members × 1 × 1)
    tables: tuple = ()  # Adam's bias corrections by step (`corrections`)
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def keep(self, sel: torch.Tensor) -> None:
        """Drop the groups outside `sel` (a bool per live group)."""
        if bool(sel.all()):
            return
        self.gens = [g for g, k in zip(self.gens, sel.tolist()) if k]
        for name in ("ids", "W", "m", "v", "t", "l2"):
            setattr(self, name, getattr(self, name)[sel])

    def step(self, grad: torch.Tensor, active: torch.Tensor | None) -> None:
        """torch.optim.Adam's update (weight decay added to the gradient) for every group, or the `active` ones."""
        G, R = self.l2.shape[:2]
        self.t += 1 if active is None else active.long()
        size, bc2 = (tab[self.t].view(G, 1, 1, 1) for tab in self.tables)
        W = self.W.view(G, R, -1, self.W.shape[-1])
        g = torch.addcmul(grad.view(W.shape), self.l2, W)
        if active is None:
            self.m.lerp_(g, 1 - self.b1)
            self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            W.sub_(self.m / (self.v.sqrt() / bc2).add_(self.eps) * size)
            return
        a = active.view(G, 1, 1, 1)
        self.m.copy_(torch.where(a, self.m.lerp(g, 1 - self.b1), self.m))
        self.v.copy_(torch.where(a, self.v * self.b2 + (1 - self.b2) * g * g, self.v))
        W.sub_(torch.where(a, self.m / (self.v.sqrt() / bc2).add_(self.eps) * size, 0.0))

    def corrections(self, steps: int) -> None:
        """Adam's step size lr / (1 − β1^t) and √(1 − β2^t) for t = 0 … `steps`, computed as torch does (in double,
        then used in float): looked up per group at each step."""
        t = torch.arange(steps + 1, dtype=torch.float64)
        bc1, bc2 = (1 - self.b1 ** t).clamp_min(1e-30), (1 - self.b2 ** t).clamp_min(1e-30)
        self.tables = ((self.lr / bc1).float().to(self.W.device), bc2.sqrt().float().to(self.W.device))


def _start(groups: _Groups, n_classes: int, dim: int, seed: int, device: str) -> _Live:
    """Every group's seeded init, as TorchLogReg draws it (weight, then bias, from the fit's own generator)."""
    G, R = groups.l2.shape
    gens = [torch.Generator().manual_seed(seed) for _ in range(G)]
    W = torch.empty(G, R, n_classes, dim + 1)
    bound = 1 / np.sqrt(dim)
    for g, gen in enumerate(gens):
        w, b = torch.empty(n_classes, dim), torch.empty(n_classes)
        w.uniform_(-bound, bound, generator=gen)
        b.uniform_(-bound, bound, generator=gen)
        W[g] = torch.cat([w, b[:, None]], 1)
    l2 = torch.as_tensor(groups.l2, dtype=torch.float32).view(G, R, 1, 1)
    return _Live(torch.arange(G), gens, W.view(G, R * n_classes, dim + 1).to(device), torch.zeros_like(W).to(device),
                 torch.zeros_like(W).to(device), torch.zeros(G, dtype=torch.long, device=device), l2.to(device))


def train_fits(E: np.ndarray, y: np.ndarray, fits: list[Fit], n_classes: int, batch_size: int = 64,
               tenacity: int = 5, epoch_size: int = 4, max_epoch: int = 200, seed: int = SEED,
               device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Every fit's best-validation (weights, biases): (fits × classes × dim, fits × classes), as TorchLogReg would
    have ended each of them. `y` holds class indices 0 … n_classes − 1."""
    groups = _group(fits)
    G, R = groups.l2.shape
    E1 = torch.cat([torch.as_tensor(E, dtype=torch.float32), torch.ones(len(E), 1)], 1).to(device)
    yt = torch.as_tensor(y, dtype=torch.long, device=device)
    Y = torch.nn.functional.one_hot(yt, n_classes).to(torch.float32)
    live = _start(groups, n_classes, E1.shape[1] - 1, seed, device)
    live.corrections((max_epoch + epoch_size + 1) * -(-max(len(t) for t in groups.train) // batch_size))
    vidx, vmask = (t.to(device) for t in _pad(groups.val))
    best = torch.zeros(G, R, n_classes, E1.shape[1], device=device)
    best_acc = torch.full((G, R), -1.0, dtype=torch.float64, device=device)
    stale = torch.zeros(G, R, dtype=torch.long, device=device)
    done = torch.zeros(G, R, dtype=torch.bool, device=device)
    sizes = np.bincount([g for g, _ in groups.slot], minlength=G)
    done[torch.as_tensor(np.arange(R)[None, :] >= sizes[:, None])] = True  # a group's empty members: done at once
    epoch = 0
    while epoch <= max_epoch and len(live.ids):
        for _ in range(epoch_size):
            _epoch(live, groups.train, E1, Y, batch_size)
        epoch += epoch_size
        ids = live.ids
        acc, d = _val_accuracy(live, E1, yt, vidx[ids], vmask[ids]), done[ids]
        better = (acc > best_acc[ids]) & ~d
        gi, ri = better.nonzero(as_tuple=True)
        best[ids[gi], ri] = live.W.view(len(ids), R, n_classes, -1)[gi, ri]
        best_acc[ids[gi], ri] = acc[gi, ri]
        worse = ~better & ~d
        d = d | (worse & (stale[ids] >= tenacity))
        stale[ids] += (worse & ~d).long()
        done[ids] = d
        live.keep(~d.all(1))
    out = torch.stack([best[g, r] for g, r in groups.slot])
    return out[..., :-1].contiguous(), out[..., -1].contiguous()


def _val_accuracy(live: _Live, E1: torch.Tensor, y: torch.Tensor, vidx: torch.Tensor, vmask: torch.Tensor,
                  chunk: int = 16) -> torch.Tensor:
    """Accuracy of every live fit on its group's early-stopping rows: (groups × members)."""
    G, D1 = len(live.ids), E1.shape[1]
    R = live.l2.shape[1]
    hits = []
    for s in range(0, G, chunk):  # a few groups at a time: the gathered rows stay small
        X = E1.index_select(0, vidx[s:s + chunk].reshape(-1)).view(-1, vidx.shape[1], D1)
        logits = torch.bmm(live.W[s:s + chunk], X.transpose(1, 2)).view(len(X), R, -1, vidx.shape[1])
        hit = (_argmax_classes(logits) == y[vidx[s:s + chunk]][:, None]) & vmask[s:s + chunk][:, None]
        hits.append(hit.sum(2))
    return torch.cat(hits).double() / vmask.sum(1, keepdim=True).clamp_min(1).double()


def _argmax_classes(logits: torch.Tensor) -> torch.Tensor:
    """argmax over dim 2 (the classes; ties to the first, as argmax), one comparison per class: torch's argmax over
    a short middle axis is many times slower."""
    best, pred = logits[:, :, 0], torch.zeros_like(logits[:, :, 0], dtype=torch.long)
    for c in range(1, logits.shape[2]):
        gt = logits[:, :, c] > best
        pred.masked_fill_(gt, c)
        best = torch.maximum(best, logits[:, :, c])
    return pred


def _epoch(live: _Live, train: list[np.ndarray], E1: torch.Tensor, Y: torch.Tensor, batch_size: int) -> None:
    """One epoch of every live group: its own permutation of its rows, in batches of `batch_size`; the softmax
    cross-entropy's gradient written out (mean over each group's own rows)."""
    G, D1, device = len(live.ids), E1.shape[1], E1.device
    perms = [train[g][torch.randperm(len(train[g]), generator=gen).numpy()]
             for g, gen in zip(live.ids.tolist(), live.gens)]
    idx, mask = (t.to(device) for t in _pad(perms))
    counts = mask.sum(1)
    Yp = Y[idx].transpose(1, 2)  # groups × classes × rows, in each group's order
    R, C = live.l2.shape[1], Y.shape[1]
    shortest = min(len(p) for p in perms)
    for s in range(0, idx.shape[1], batch_size):
        r = idx[:, s:s + batch_size]
        X = E1.index_select(0, r.reshape(-1)).view(G, -1, D1)
        P = torch.bmm(live.W, X.transpose(1, 2)).view(G, R, C, -1).softmax(2).sub_(Yp[:, None, :, s:s + batch_size])
        if s + batch_size <= shortest:  # every group has a full batch: the common step
            live.step(torch.bmm(P.mul_(1.0 / batch_size).view(G, R * C, -1), X), None)
            continue
        n = (counts - s).clamp(0, batch_size)
        w = mask[:, s:s + batch_size] / n.clamp_min(1)[:, None]
        live.step(torch.bmm(P.mul_(w[:, None, None, :]).view(G, R * C, -1), X), n > 0)


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


def choose_and_fit(E, yi, n_classes, parts: list[np.ndarray], k: int, device: str = "cpu"
                   ) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """For each training part, the weight decay with the best mean accuracy over its stratified k-fold (ties go to
    the first, as np.argmax does), and the final fit on the whole part at that weight decay (early-stopped on its
    seeded 5 %). Every fit is trained in one batch: the inner folds × weight decays, and the final fit at every
    weight decay (the unchosen ones are dropped), so the final fits need no second pass. (regs, weights, biases)."""
    fits, where = [], []
    for p, tr in enumerate(parts):
        for a, b in _inner(tr, yi, k):
            for j, l2 in enumerate(L2_GRID):
                fits.append(Fit(a, b, l2))
                where.append((p, j))
    finals = [fit_with_split(tr, l2) for tr in parts for l2 in L2_GRID]
    W, B = train_fits(E, yi, fits + finals, n_classes, device=device)
    accs = np.zeros((len(parts), len(L2_GRID)))
    for (p, j), pred, fit in zip(where, _predict(E, W, B, [f.val for f in fits]), fits):
        accs[p, j] += (pred == yi[fit.val]).mean() / k
    chosen = [int(np.argmax(a)) for a in accs]
    keep = [len(fits) + p * len(L2_GRID) + j for p, j in enumerate(chosen)]
    return [float(L2_GRID[j]) for j in chosen], W[keep], B[keep]


def cv_accuracy(X: np.ndarray, y: np.ndarray, k: int = 10, inner_k: int = 10, device: str = "cpu"
                ) -> tuple[float, list[float]]:
    """transfer.cv_accuracy(classifier="pytorch"), batched: (accuracy ×100, the weight decay of each outer fold)."""
    from sklearn.model_selection import StratifiedKFold

    classes, yi = _classes(y)
    outer = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=SEED).split(X, y))
    regs, W, B = choose_and_fit(X, yi, len(classes), [tr for tr, _ in outer], inner_k, device)
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
    (reg,), W, B = choose_and_fit(E, yi, len(classes), [tr], k, device)
    pred = classes[_predict(E, W, B, [te])[0]]
    f1 = 100.0 * f1_score(yte, pred) if len(classes) == 2 else float("nan")
    return 100.0 * float((pred == yte).mean()), float(f1), reg
