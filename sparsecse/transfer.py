"""SentEval transfer tasks (MR, CR, SUBJ, MPQA, SST-2, TREC, MRPC) on frozen embeddings, as SimCSE runs them.

Protocol (SentEval, sklearn path): logistic regression with the L2 strength C chosen from 2^-2 … 2^3;
MR/CR/SUBJ/MPQA: 10-fold stratified CV with an inner k-fold choosing C; SST-2: C chosen on dev, test accuracy;
TREC and MRPC: C chosen by k-fold CV on train, test accuracy (MRPC also F1). MRPC pair features are
[u, v, |u−v|, u·v] by default (`mrpc_features="full"`); SentEval's MRPCEval itself uses [|u−v|, u·v]
(`mrpc_features="senteval"`). Seeds fixed (1111, SentEval's), so results repeat exactly. Each unique sentence is
encoded once and reused across folds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import SparseCSEError
from .config import TRANSFER_TASKS
from .data import norm_space, read_lines

C_GRID = tuple(2.0 ** t for t in range(-2, 4))
SEED = 1111
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


# --------------------------------------------------------------------------- classifier protocol (pure)

def _fit(X, y, C):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=1000, random_state=SEED).fit(X, y)


def choose_c(X: np.ndarray, y: np.ndarray, k: int = 10, grid=C_GRID) -> float:
    """The C with the best mean accuracy over a stratified k-fold of (X, y)."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=SEED)
    scores = []
    for C in grid:
        accs = [(_fit(X[tr], y[tr], C).predict(X[va]) == y[va]).mean() for tr, va in skf.split(X, y)]
        scores.append(np.mean(accs))
    return float(grid[int(np.argmax(scores))])


def cv_accuracy(X: np.ndarray, y: np.ndarray, k: int = 10, inner_k: int = 10) -> float:
    """Outer stratified k-fold accuracy ×100, C chosen by an inner k-fold on each outer training part."""
    from sklearn.model_selection import StratifiedKFold

    accs = []
    for tr, te in StratifiedKFold(n_splits=k, shuffle=True, random_state=SEED).split(X, y):
        C = choose_c(X[tr], y[tr], inner_k)
        accs.append((_fit(X[tr], y[tr], C).predict(X[te]) == y[te]).mean())
    return 100.0 * float(np.mean(accs))


def dev_test_accuracy(Xtr, ytr, Xdev, ydev, Xte, yte, grid=C_GRID) -> float:
    devs = [(_fit(Xtr, ytr, C).predict(Xdev) == ydev).mean() for C in grid]
    C = grid[int(np.argmax(devs))]
    return 100.0 * float((_fit(Xtr, ytr, C).predict(Xte) == yte).mean())


def train_test_scores(Xtr, ytr, Xte, yte, k: int = 10) -> tuple[float, float]:
    """(accuracy ×100, F1 ×100 for binary labels) with C chosen by k-fold CV on train."""
    from sklearn.metrics import f1_score

    C = choose_c(Xtr, ytr, k)
    pred = _fit(Xtr, ytr, C).predict(Xte)
    f1 = 100.0 * f1_score(yte, pred) if len(np.unique(ytr)) == 2 else float("nan")
    return 100.0 * float((pred == yte).mean()), float(f1)


# --------------------------------------------------------------------------- evaluation

def pair_features(u: np.ndarray, v: np.ndarray, kind: str = "full") -> np.ndarray:
    """(N, D) × 2 -> [u, v, |u−v|, u·v] (N, 4D), or SentEval's MRPC [|u−v|, u·v] (N, 2D)."""
    if kind == "senteval":
        return np.c_[np.abs(u - v), u * v]
    return np.c_[u, v, np.abs(u - v), u * v]


def evaluate_transfer(enc, data_dir: Path, tasks=TRANSFER_TASKS, pooler: str | None = None, batch_size: int = 128,
                      k: int = 10, inner_k: int = 10, max_examples: int | None = None,
                      mrpc_features: str = "full", progress: bool = False) -> dict[str, float]:
    """{task: accuracy ×100, "MRPC_f1": F1, "avg": mean accuracy}."""
    from .evaluate import encode

    loaded = {t: load_task(data_dir, t) for t in tasks}
    if max_examples:
        loaded = {t: _subsample(task, max_examples) for t, task in loaded.items()}
    sents = []
    for task in loaded.values():
        for xs, _ in task.data.values():
            sents += (xs[0] + xs[1]) if task.kind == "pairs" else xs
    emb = encode(enc, sents, batch_size=batch_size, pooler=pooler, progress=progress)

    def feats(xs):
        return np.stack([emb[s].numpy() for s in xs]).astype(np.float64)

    res = {}
    for t, task in loaded.items():
        if task.kind == "cv":
            xs, y = task.data["all"]
            res[t] = cv_accuracy(feats(xs), y, k, inner_k)
        elif task.kind == "dev":
            (a, ya), (b, yb), (c, yc) = (task.data[s] for s in ("train", "dev", "test"))
            res[t] = dev_test_accuracy(feats(a), ya, feats(b), yb, feats(c), yc)
        elif task.kind == "train_test":
            (a, ya), (c, yc) = task.data["train"], task.data["test"]
            res[t] = train_test_scores(feats(a), ya, feats(c), yc, inner_k)[0]
        else:
            def pf(pair):
                u, v = feats(pair[0]), feats(pair[1])
                return pair_features(u, v, mrpc_features)
            (a, ya), (c, yc) = task.data["train"], task.data["test"]
            res[t], res[f"{t}_f1"] = train_test_scores(pf(a), ya, pf(c), yc, inner_k)
    res["avg"] = float(np.mean([res[t] for t in tasks]))
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
    from .tables import label, render

    tasks = [t for t in TRANSFER_TASKS if any(t in r for r in rows.values())]
    return render(["Model", *(label(t) for t in [*tasks, "avg"])],
                  [[name, *(r[t] for t in [*tasks, "avg"])] for name, r in rows.items()])
