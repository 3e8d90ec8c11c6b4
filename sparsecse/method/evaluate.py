"""STS evaluation under the SentEval protocol (as SimCSE runs it), plus alignment/uniformity.

Each unique sentence is encoded once (batches sorted by token count); cosine similarity per pair; Spearman ×100.
STS12–16: one Spearman over all subsets of the year concatenated (SimCSE's "all"); STS-B, SICK-R: test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import STS_TASKS
from ..core.io import parquet_bytes
from .data import Pairs, collate, load_sts_task, load_stsb, positives
from .losses import alignment, uniformity



def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ (average ranks for ties) by scipy, as SentEval computes it; nan for a constant input."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).correlation)


def aggregate_all(sys_by_subset: dict[str, np.ndarray], gold_by_subset: dict[str, np.ndarray]) -> float:
    """SimCSE's "all": one Spearman over every subset's pairs concatenated."""
    keys = list(gold_by_subset)
    return spearman(np.concatenate([sys_by_subset[k] for k in keys]), np.concatenate([gold_by_subset[k] for k in keys]))


@torch.no_grad()
def encode(enc, sentences: list[str], batch_size: int = 128, max_len: int | None = None,
           pooler: str | None = None, progress: bool = False, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """{sentence: (D,) embedding}, each unique sentence encoded once.

    All unique sentences are tokenized in one call, then batched in order of token count, so a batch holds
    sentences of (almost) the same length and the padded attention wastes next to nothing. precision="bf16" runs
    the forward under bfloat16 autocast (GPUs; CPUs with AMX or AVX-512-bf16): faster, not SentEval's numbers to
    the digit (the embeddings are returned in fp32).
    """
    uniq = list(dict.fromkeys(sentences))
    limit = max_len or min(enc.tokenizer.model_max_length, 512)
    ids = enc.tokenizer(uniq, truncation=True, max_length=limit)["input_ids"]
    order = sorted(range(len(uniq)), key=lambda i: (len(ids[i]), i))
    pad = enc.tokenizer.pad_token_id or 0
    was_training = enc.training
    enc.eval()
    device = next(enc.parameters()).device
    out: dict[str, torch.Tensor] = {}
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="encode", unit="batch", leave=False)
    for i in batches:
        chunk = order[i:i + batch_size]
        b = collate([{"input_ids": ids[j]} for j in chunk], pad)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            emb = enc(b["input_ids"].to(device), b["attention_mask"].to(device), pooler=pooler).float().cpu()
        out.update(zip((uniq[j] for j in chunk), emb))
    enc.train(was_training)
    return out


def cosine_scores(emb: dict[str, torch.Tensor], pairs: Pairs) -> np.ndarray:
    a = torch.stack([emb[s] for s in pairs.s1])
    b = torch.stack([emb[s] for s in pairs.s2])
    return F.cosine_similarity(a, b, dim=-1).double().numpy()


def sts_predictions(emb: dict[str, torch.Tensor], loaded: dict[str, dict[str, Pairs]]) -> dict[str, tuple]:
    """{task: (cosine per pair, gold per pair)}, each task's subsets concatenated in file order: what its one
    Spearman is computed on (and what a bootstrap over test pairs resamples)."""
    out = {}
    for task, subsets in loaded.items():
        out[task] = (np.concatenate([cosine_scores(emb, p) for p in subsets.values()]),
                     np.concatenate([p.gold for p in subsets.values()]))
    return out


def sts_from_predictions(preds: dict[str, tuple]) -> dict[str, float]:
    """{task: Spearman × 100 over its concatenated pairs (SimCSE's "all"), "avg": the mean over tasks}."""
    res = {task: 100.0 * spearman(sys, gold) for task, (sys, gold) in preds.items()}
    res["avg"] = float(np.mean([res[t] for t in preds]))
    return res


def predictions_to_bytes(preds: dict[str, tuple]) -> bytes:
    """Parquet of one model's STS test predictions: columns task, pred (cosine), gold; pairs in file order."""
    import pyarrow as pa

    tasks = [t for t, (sys, _) in preds.items() for _ in range(len(sys))]
    return parquet_bytes(pa.table({"task": pa.array(tasks).dictionary_encode(),
                                   "pred": pa.array(np.concatenate([p[0] for p in preds.values()]), pa.float64()),
                                   "gold": pa.array(np.concatenate([p[1] for p in preds.values()]), pa.float64())}))


def predictions_from_bytes(data: bytes) -> dict[str, tuple]:
    import io

    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(data)).to_pydict()
    task, pred, gold = np.array([str(x) for x in t["task"]]), np.asarray(t["pred"]), np.asarray(t["gold"])
    return {k: (pred[task == k], gold[task == k]) for k in dict.fromkeys(task.tolist())}


def evaluate_sts(enc, data_dir: Path, tasks=STS_TASKS, batch_size: int = 128, max_len: int | None = None,
                 pooler: str | None = None, progress: bool = False, alignment_uniformity: bool = False,
                 predictions: dict | None = None, precision: str = "fp32") -> dict[str, float]:
    """{task: Spearman×100, ..., "avg": mean over the tasks}; all tasks' sentences encoded in one pass (at
    `precision`, see `encode`).

    With `alignment_uniformity`, also "align"/"uniform" on STS-B test from the same embeddings. A dict passed as
    `predictions` receives {task: (cosine per pair, gold per pair)} (see `sts_predictions`).
    """
    loaded = {t: load_sts_task(data_dir, t) for t in tasks}
    sentences = [s for subsets in loaded.values() for p in subsets.values() for s in (*p.s1, *p.s2)]
    stsb = load_stsb(data_dir, "test") if alignment_uniformity else None
    if stsb is not None:
        sentences += stsb.s1 + stsb.s2
    emb = encode(enc, sentences, batch_size=batch_size, max_len=max_len, pooler=pooler, progress=progress,
                 precision=precision)
    preds = sts_predictions(emb, loaded)
    if predictions is not None:
        predictions.update(preds)
    res = sts_from_predictions(preds)
    if stsb is not None:
        res.update(align_uniform_from_embeddings(emb, stsb))
    return res


def evaluate_pairs(enc, pairs: Pairs, batch_size: int = 128, max_len: int | None = None, pooler: str | None = None) -> float:
    emb = encode(enc, pairs.s1 + pairs.s2, batch_size=batch_size, max_len=max_len, pooler=pooler)
    return 100.0 * spearman(cosine_scores(emb, pairs), pairs.gold)


def align_uniform_from_embeddings(emb: dict[str, torch.Tensor], pairs: Pairs, threshold: float = 4.0,
                                  rule: str = "gt") -> dict[str, float]:
    """SimCSE §5: alignment on pairs with gold > 4, uniformity over all the pairs' unique sentences."""
    pos = positives(pairs.gold, threshold, rule)
    a = torch.stack([emb[s] for s, k in zip(pairs.s1, pos) if k])
    b = torch.stack([emb[s] for s, k in zip(pairs.s2, pos) if k])
    allv = torch.stack([emb[s] for s in dict.fromkeys(pairs.s1 + pairs.s2)])
    return {"align": float(alignment(a, b)), "uniform": float(uniformity(allv))}
