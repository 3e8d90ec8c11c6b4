"""SentEval transfer tasks (MR, CR, SUBJ, MPQA, SST-2, TREC, MRPC) on frozen embeddings.

Two classifiers, named for what they are:
- `classifier="pytorch"` (default) — SimCSE's protocol: SentEval with `usepytorch=True` and SimCSE's test-mode
  classifier {nhid 0, optim adam, batch_size 64, tenacity 5, epoch_size 4}: logistic regression trained by Adam,
  L2 (weight decay) chosen from 1e-5 … 1e-2, early stopping on a validation split (the inner fold's held-out part,
  the dev set for SST-2, else 5 % of train) after `tenacity` rounds of `epoch_size` epochs without improvement.
  It runs batched (`classifier.py`: every fit of a task trained at once; tests/transfer_oracle.py holds the
  one-fit-after-another protocol it is checked against, fit for fit).
- `classifier="sklearn"` — SentEval's scikit-learn path: LogisticRegression with C from 2^-2 … 2^3.
Splits: MR/CR/SUBJ/MPQA: 10-fold stratified CV with an inner k-fold choosing the regulariser; SST-2: chosen on dev,
test accuracy; TREC and MRPC: chosen by k-fold CV on train, test accuracy (MRPC also F1). MRPC pair features are
SentEval's MRPCEval [|u−v|, u·v] by default (`mrpc_features="senteval"`); "full" gives [u, v, |u−v|, u·v].
Seeds fixed (1111, SentEval's), so results repeat exactly here (not bit-for-bit SentEval's own draws). Each unique
sentence is encoded once and reused across folds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import SparseCSEError
from ..core.config import TRANSFER_TASKS
from ..core.tables import label, render
from .classifier import SEED
from .data import norm_space, read_lines
from .evaluate import encode
from . import classifier as batched

C_GRID = tuple(2.0 ** t for t in range(-2, 4))  # sklearn: inverse L2 strength
CLASSIFIERS = ("pytorch", "sklearn")
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


@dataclass(frozen=True)
class Task:
    kind: str  # "cv" | "dev" | "train_test" | "pairs"
    data: dict  # split -> (sentences or (s1, s2), labels)


def _binary(pos: Path, neg: Path, pos_label: int = 1) -> Task:
    # SentEval keeps every line, blank ones included (CR has 3,775 examples, MPQA 10,606)
    p = [norm_space(x) for x in read_lines(pos, "latin-1")]
    n = [norm_space(x) for x in read_lines(neg, "latin-1")]
    return Task("cv", {"all": (p + n, np.array([pos_label] * len(p) + [1 - pos_label] * len(n)))})


def load_task(data_dir: Path, task: str) -> Task:
    d = Path(data_dir) / "senteval"
    if task == "MR":
        return _binary(d / "MR" / "rt-polarity.pos", d / "MR" / "rt-polarity.neg")
    if task == "CR":
        return _binary(d / "CR" / "custrev.pos", d / "CR" / "custrev.neg")
    if task == "SUBJ":
        return _binary(d / "SUBJ" / "subj.objective", d / "SUBJ" / "subj.subjective")
    if task == "MPQA":
        return _binary(d / "MPQA" / "mpqa.pos", d / "MPQA" / "mpqa.neg")
    if task == "SST2":
        data = {}
        for split in ("train", "dev", "test"):
            path = d / "SST" / "binary" / f"sentiment-{split}"
            xs, ys = [], []
            for i, line in enumerate(read_lines(path), start=1):
                cols = line.strip().split("\t")
                if len(cols) != 2 or cols[1] not in ("0", "1"):
                    raise SparseCSEError(f"{path}:{i}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
                xs.append(norm_space(cols[0]))
                ys.append(int(cols[1]))
            data[split] = (xs, np.array(ys))
        return Task("dev", data)
    if task == "TREC":
        data = {}
        for split, name in (("train", "train_5500.label"), ("test", "TREC_10.label")):
            path = d / "TREC" / name
            xs, ys = [], []
            for i, line in enumerate(read_lines(path, "latin-1"), start=1):
                if not line.strip():
                    continue
                target, _, rest = line.strip().partition(":")
                if target not in TREC_CLASSES or " " not in rest:
                    raise SparseCSEError(f"{path}:{i}: expected 'LABEL:fine question' with LABEL in "
                                         f"{'/'.join(TREC_CLASSES)}, got {line[:60]!r}")
                xs.append(norm_space(rest.split(" ", 1)[1]))
                ys.append(TREC_CLASSES.index(target))
            data[split] = (xs, np.array(ys))
        return Task("train_test", data)
    if task == "MRPC":
        data = {}
        for split in ("train", "test"):
            path = d / "MRPC" / f"msr_paraphrase_{split}.txt"
            s1, s2, ys = [], [], []
            for i, line in enumerate(read_lines(path, "utf-8-sig"), start=1):
                if i == 1:
                    continue
                cols = line.strip().split("\t")
                if len(cols) < 5 or cols[0] not in ("0", "1"):
                    raise SparseCSEError(f"{path}:{i}: expected 'Quality<TAB>id<TAB>id<TAB>s1<TAB>s2' with Quality 0|1")
                s1.append(norm_space(cols[3]))
                s2.append(norm_space(cols[4]))
                ys.append(int(cols[0]))
            data[split] = ((s1, s2), np.array(ys))
        return Task("pairs", data)
    raise SparseCSEError(f"unknown transfer task {task!r}; choose from {', '.join(TRANSFER_TASKS)}")


# --------------------------------------------------------------------------- the one-fit-at-a-time protocol (pure)

@dataclass(frozen=True)
class Learner:
    """A classifier fitted one regulariser at a time: `fit(X, y, reg, val)` returns an object with `.predict(X)`;
    `grid` is the regulariser's values. The sklearn path is one; the tests' sequential oracle of the batched
    pytorch protocol (tests/transfer_oracle.py) is another."""

    name: str
    grid: tuple
    fit: Callable


def _sklearn_fit(X, y, reg, val=None):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=reg, max_iter=1000, random_state=SEED).fit(X, y)


SKLEARN = Learner("sklearn", C_GRID, _sklearn_fit)


def choose_c(X: np.ndarray, y: np.ndarray, k: int = 10, learner: Learner = SKLEARN) -> float:
    """The regulariser with the best mean accuracy over a stratified k-fold of (X, y) (as SentEval, a classifier
    that early-stops does so on the held-out fold it is scored on)."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=SEED)
    scores = []
    for reg in learner.grid:
        accs = [(learner.fit(X[tr], y[tr], reg, (X[va], y[va])).predict(X[va]) == y[va]).mean()
                for tr, va in skf.split(X, y)]
        scores.append(np.mean(accs))
    return float(learner.grid[int(np.argmax(scores))])


def cv_accuracy(X: np.ndarray, y: np.ndarray, k: int = 10, inner_k: int = 10, learner: Learner = SKLEARN) -> float:
    """Outer stratified k-fold accuracy ×100, the regulariser chosen by an inner k-fold on each outer training part."""
    from sklearn.model_selection import StratifiedKFold

    accs = []
    for tr, te in StratifiedKFold(n_splits=k, shuffle=True, random_state=SEED).split(X, y):
        reg = choose_c(X[tr], y[tr], inner_k, learner)
        accs.append((learner.fit(X[tr], y[tr], reg).predict(X[te]) == y[te]).mean())
    return 100.0 * float(np.mean(accs))


def dev_test_accuracy(Xtr, ytr, Xdev, ydev, Xte, yte, learner: Learner = SKLEARN) -> float:
    devs = [(learner.fit(Xtr, ytr, reg, (Xdev, ydev)).predict(Xdev) == ydev).mean() for reg in learner.grid]
    reg = learner.grid[int(np.argmax(devs))]
    return 100.0 * float((learner.fit(Xtr, ytr, reg, (Xdev, ydev)).predict(Xte) == yte).mean())


def train_test_scores(Xtr, ytr, Xte, yte, k: int = 10, learner: Learner = SKLEARN) -> tuple[float, float]:
    """(accuracy ×100, F1 ×100 for binary labels) with the regulariser chosen by k-fold CV on train."""
    from sklearn.metrics import f1_score

    reg = choose_c(Xtr, ytr, k, learner)
    pred = learner.fit(Xtr, ytr, reg).predict(Xte)
    f1 = 100.0 * f1_score(yte, pred) if len(np.unique(ytr)) == 2 else float("nan")
    return 100.0 * float((pred == yte).mean()), float(f1)


# --------------------------------------------------------------------------- evaluation

def pair_features(u: np.ndarray, v: np.ndarray, kind: str = "full") -> np.ndarray:
    """(N, D) × 2 -> [u, v, |u−v|, u·v] (N, 4D), or SentEval's MRPC [|u−v|, u·v] (N, 2D)."""
    if kind == "senteval":
        return np.c_[np.abs(u - v), u * v]
    return np.c_[u, v, np.abs(u - v), u * v]


def evaluate_transfer(enc, data_dir: Path, tasks=TRANSFER_TASKS, folds: tuple[int, int] = (10, 10),
                      max_examples: int | None = None, mrpc_features: str = "senteval", classifier: str = "pytorch",
                      **encode_kw) -> dict[str, float]:
    """{task: accuracy ×100, "MRPC_f1": F1, "avg": mean accuracy}. `folds` = (outer k of the cross-validated
    tasks, inner k that chooses the regulariser): SentEval's (10, 10). `encode_kw` (pooler, batch_size, progress,
    precision) go to evaluate.encode."""
    _protocols(classifier)  # an unknown classifier fails before anything is encoded
    loaded = load_tasks(data_dir, tasks, max_examples)
    emb = encode(enc, task_sentences(loaded), **encode_kw)
    return transfer_scores(loaded, emb, folds, classifier, mrpc_features)


def load_tasks(data_dir: Path, tasks=TRANSFER_TASKS, max_examples: int | None = None) -> dict[str, Task]:
    loaded = {t: load_task(data_dir, t) for t in tasks}
    return {t: _subsample(task, max_examples) for t, task in loaded.items()} if max_examples else loaded


def task_sentences(loaded: dict[str, Task]) -> list[str]:
    """Every sentence the tasks hold (each encoded once by the caller)."""
    sents = []
    for task in loaded.values():
        for xs, _ in task.data.values():
            sents += (xs[0] + xs[1]) if task.kind == "pairs" else xs
    return sents


def _protocols(classifier: "str | Learner"):
    """(cv accuracy, dev/test accuracy, train/test (accuracy, F1)) of a classifier, as functions of features."""
    if classifier == "pytorch":  # SimCSE's protocol, every fit of a task at once
        return ((lambda *a: batched.cv_accuracy(*a)[0]), (lambda *a: batched.dev_test_accuracy(*a)[0]),
                (lambda *a: batched.train_test_scores(*a)[:2]))
    learner = SKLEARN if classifier == "sklearn" else classifier
    if not isinstance(learner, Learner):
        raise SparseCSEError(f"transfer classifier {classifier!r}: choose pytorch (SimCSE's) or sklearn")
    return ((lambda X, y, k, ik: cv_accuracy(X, y, k, ik, learner)), (lambda *a: dev_test_accuracy(*a, learner)),
            (lambda *a: train_test_scores(*a, learner)))


def transfer_scores(loaded: dict[str, Task], emb, folds: tuple[int, int] = (10, 10), classifier: "str | Learner" = "pytorch",
                    mrpc_features: str = "senteval") -> dict[str, float]:
    """The tasks' figures from sentence embeddings (`emb[sentence]`, a tensor), by `classifier`."""
    k, inner_k = folds
    cv_acc, dev_test, scores = _protocols(classifier)

    def feats(xs):
        return np.stack([emb[s].numpy() for s in xs]).astype(np.float64)

    res = {}
    for t, task in loaded.items():
        if task.kind == "cv":
            xs, y = task.data["all"]
            res[t] = cv_acc(feats(xs), y, k, inner_k)
        elif task.kind == "dev":
            (a, ya), (b, yb), (c, yc) = (task.data[s] for s in ("train", "dev", "test"))
            res[t] = dev_test(feats(a), ya, feats(b), yb, feats(c), yc)
        elif task.kind == "train_test":
            (a, ya), (c, yc) = task.data["train"], task.data["test"]
            res[t] = scores(feats(a), ya, feats(c), yc, inner_k)[0]
        else:
            (a, ya), (c, yc) = task.data["train"], task.data["test"]
            fa, fc = (pair_features(feats(p[0]), feats(p[1]), mrpc_features) for p in (a, c))
            res[t], res[f"{t}_f1"] = scores(fa, ya, fc, yc, inner_k)
    res["avg"] = float(np.mean([res[t] for t in loaded]))
    return res


def _subsample(task: Task, n: int) -> Task:
    """First-n stratified subsample of each split (for quick runs and tests)."""
    rng = np.random.default_rng(SEED)
    out = {}
    for split, (xs, y) in task.data.items():
        idx = np.sort(rng.permutation(len(y))[:n])
        if task.kind == "pairs":
            out[split] = (([xs[0][i] for i in idx], [xs[1][i] for i in idx]), y[idx])
        else:
            out[split] = ([xs[i] for i in idx], y[idx])
    return Task(task.kind, out)


def format_transfer_markdown(rows: dict[str, dict]) -> str:
    tasks = [t for t in TRANSFER_TASKS if any(t in r for r in rows.values())]
    return render(["Model", *(label(t) for t in [*tasks, "avg"])],
                  [[name, *(r[t] for t in [*tasks, "avg"])] for name, r in rows.items()])
