"""Importance scores for heads (ξ) and FFN neurons (ν) from alignment and uniformity (SparseCSE §2.2).

L_score = λ·L_align + (1−λ)·L_uniform, importance = E_batches |∂L_score/∂mask| (Molchanov et al. 2019).
One pass serves every λ exactly: per batch we store g_align = ∂L_align/∂mask and g_uniform = ∂L_uniform/∂mask,
and the score for any λ is mean_b |λ·g_align,b + (1−λ)·g_uniform,b| (`combine`), no model needed.
Stored as Parquet (long format, one row per batch × unit) with fingerprints in the schema metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import SparseCSEError, __version__
from ..core.io import atomic_write_bytes, parquet_bytes
from .data import Pairs, load_stsb, positives, sts_test_overlap, train_path, unlabeled_pairs
from .losses import alignment, info_nce, uniformity
from .model import Encoder, head_dim, intermediate_size, weights_fingerprint

HEAD, NEURON = 0, 1


def combine(g_align: np.ndarray, g_uniform: np.ndarray, lam: float) -> np.ndarray:
    """(nb, ...) per-batch gradients -> (...) importance: mean_b |λ·g_align,b + (1−λ)·g_uniform,b|."""
    if not 0.0 <= lam <= 1.0:
        raise SparseCSEError(f"λ={lam} is outside [0, 1]")
    return np.abs(lam * g_align + (1.0 - lam) * g_uniform).mean(axis=0)


def per_layer_l2(x: np.ndarray) -> np.ndarray:
    """(L, U) scores, each layer divided by its L2 norm (a layer of zeros stays zero): layers compete on shape,
    not on scale."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x, dtype=np.float64), where=n > 0)


def importance(g_align: np.ndarray, g_uniform: np.ndarray, lam: float, combine_how: str = "gradient",
               normalize: str = "none") -> np.ndarray:
    """(nb, L, U) per-batch gradients -> (L, U) importance, the two readings of the paper:
    combine "gradient": E_b|λ·g_align + (1−λ)·g_uniform|, the Taylor score of the combined loss (the paper's text);
    combine "score":    λ·N(E_b|g_align|) + (1−λ)·N(E_b|g_uniform|), each objective scored on its own (StarK's code);
    normalize "layer":  N = per-layer L2 normalisation (for "gradient", of the combined score); "none": N = identity.
    """
    norm = per_layer_l2 if normalize == "layer" else (lambda x: x)
    if combine_how == "gradient":
        return norm(combine(g_align, g_uniform, lam))
    if combine_how == "score":
        return lam * norm(np.abs(g_align).mean(axis=0)) + (1.0 - lam) * norm(np.abs(g_uniform).mean(axis=0))
    raise SparseCSEError(f"score.combine={combine_how!r}: choose gradient or score")


def random_importance(layers: int, heads: int, intermediate: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The random control: i.i.d. uniform scores, one draw per seed (so seeds give different random masks)."""
    rng = np.random.default_rng([seed, 0x5C5E])
    return rng.random((layers, heads)), rng.random((layers, intermediate))


@torch.no_grad()
def magnitude_importance(enc: Encoder) -> tuple[np.ndarray, np.ndarray]:
    """The magnitude control: a head's score is the L2 norm of every weight that only serves it (its Q/K/V rows and
    biases, its columns of the output projection); a neuron's, of its FFN input row(s) + bias (value and gate when
    gated) and output column (the units of Adapter.head_rows / neuron_rows)."""
    a, cfg = enc.adapter, enc.backbone.config
    d, H, inter = head_dim(cfg), cfg.num_attention_heads, intermediate_size(cfg)
    every_head, every_neuron = torch.arange(H), torch.arange(inter)
    heads, neurons = [], []
    for layer in enc.layers:
        sq = 0
        for lin, rows in a.head_rows(layer, every_head, d, H):  # rows in head order, each head's d rows together
            part = lin.weight[rows].pow(2).sum(1) + (lin.bias[rows].pow(2) if lin.bias is not None else 0)
            sq = sq + part.view(-1, H * d).sum(0)  # a fused projection's q, k and v thirds added per row
        sq = sq + a.get(layer, "attn_out").weight.pow(2).sum(0)  # (H·d,)
        heads.append(sq.view(-1, d).sum(1).sqrt())
        nsq = 0
        for lin, rows in a.neuron_rows(layer, every_neuron, inter):
            part = lin.weight[rows].pow(2).sum(1) + (lin.bias[rows].pow(2) if lin.bias is not None else 0)
            nsq = nsq + part.view(-1, inter).sum(0)  # a gated projection's value and gate rows added per neuron
        neurons.append((nsq + a.get(layer, "ffn_out").weight.pow(2).sum(0)).sqrt())
    return torch.stack(heads).double().cpu().numpy(), torch.stack(neurons).double().cpu().numpy()


def score_loss(x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_align over positive pairs — 0 if the batch has none —, L_uniform over all 2B sentences)."""
    l_align = alignment(x[pos], y[pos], log=True) if bool(pos.any()) else x.sum() * 0.0
    l_unif = uniformity(torch.cat([x, y], dim=0))
    return l_align, l_unif


@dataclass(frozen=True)
class Scores:
    g_align_head: np.ndarray  # (nb, L, H)
    g_uniform_head: np.ndarray  # (nb, L, H)
    g_align_neuron: np.ndarray  # (nb, L, I)
    g_uniform_neuron: np.ndarray  # (nb, L, I)
    meta: dict

    def importance(self, lam: float, combine: str = "gradient", normalize: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """(head (L, H), neuron (L, I)) importance at λ (see `importance` for combine/normalize)."""
        return (importance(self.g_align_head, self.g_uniform_head, lam, combine, normalize),
                importance(self.g_align_neuron, self.g_uniform_neuron, lam, combine, normalize))


def data_fingerprint(pairs: Pairs) -> str:
    h = hashlib.sha256()
    for a, b, g in zip(pairs.s1, pairs.s2, pairs.gold):
        h.update(f"{a}\t{b}\t{g!r}\n".encode())
    return h.hexdigest()


def scoring_order(n: int, seed: int, max_pairs: int | None) -> np.ndarray:
    """The pairs scoring reads, in its batch order: a seeded permutation, the first `max_pairs` of it."""
    order = np.random.default_rng(seed).permutation(n)
    return order if max_pairs is None else order[:max_pairs]


def scoring_batches(n: int, batch_size: int, seed: int, max_pairs: int | None, what: str) -> list[np.ndarray]:
    """`scoring_order` cut into batches; a last batch of one (no pair to contrast) is dropped."""
    order = scoring_order(n, seed, max_pairs)
    batches = [b for b in (order[i:i + batch_size] for i in range(0, len(order), batch_size)) if len(b) >= 2]
    if not batches:
        raise SparseCSEError(f"scoring needs at least 2 {what} (got {len(order)})")
    return batches


def _mask_gradients(enc: Encoder, batches: list[np.ndarray], losses, dropout: bool,
                    progress: bool = False, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each of the losses `losses(batch)` returns, its per-batch gradients w.r.t. the head and neuron masks:
    [(heads (nb, L, H), neurons (nb, L, I))], float64. Dropout on or off as asked, restored after; with dropout
    on, its draws come from `seed` (in a forked RNG: the caller's stream is left as it was), so the same model,
    data and seed give the same scores."""
    device = next(enc.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _mask_gradients_seeded(enc, batches, losses, dropout, progress)


def _mask_gradients_seeded(enc: Encoder, batches: list[np.ndarray], losses, dropout: bool,
                           progress: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    was_training = enc.training
    enc.train(dropout)
    out: list[tuple[list, list]] = []
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="score", unit="batch")
    try:
        with enc.mask_grads() as (hm, nm):
            for b in it:
                ls = losses(b)
                out = out or [([], []) for _ in ls]
                for k, loss in enumerate(ls):
                    g = torch.autograd.grad(loss, [hm, nm], retain_graph=k < len(ls) - 1, allow_unused=True)
                    for acc, x, m in zip(out[k], g, (hm, nm)):
                        acc.append((torch.zeros_like(m) if x is None else x).double().cpu().numpy())
    finally:
        enc.train(was_training)
    return [(np.stack(h), np.stack(n)) for h, n in out]


def _encoder_meta(enc: Encoder, pooler: str | None) -> dict:
    """What a scores file records of the model it was computed on (check_compatible reads it)."""
    L, H = enc.head_mask.shape
    return {"model_fingerprint": weights_fingerprint(enc), "init_fingerprint": enc.meta.get("init_fingerprint"),
            "backbone": enc.source, "pooler": pooler or enc.pooler, "layers": int(L), "heads": int(H),
            "intermediate": int(enc.neuron_mask.shape[1]), "version": __version__}


def _embed(enc: Encoder, sentences: list[str], max_len: int | None, pooler: str | None) -> torch.Tensor:
    device = next(enc.parameters()).device
    tok = enc.tokenize(sentences, max_len)
    return enc(tok["input_ids"].to(device), tok["attention_mask"].to(device), pooler=pooler)  # (N, D)


def compute_scores(enc: Encoder, pairs: Pairs, batch_size: int = 64, positive: tuple[float, str] = (4.0, "gt"),
                   seed: int = 0, max_pairs: int | None = None, pooler: str | None = None, max_len: int | None = None,
                   progress: bool = False, dropout_views: bool = False) -> Scores:
    """Per-batch ∂L_align/∂(ξ, ν) and ∂L_uniform/∂(ξ, ν) (the paper's Eq. for L_score, §3.2) on STS pairs (dropout
    off), or — `dropout_views` — on sentences paired with themselves, dropout on, so the two views of one sentence
    are the positive pair. `positive` = (threshold, rule): a pair is positive when gold > threshold ("gt") or
    ≥ it ("ge")."""
    threshold, rule = positive
    batches = scoring_batches(len(pairs), batch_size, seed, max_pairs, "pairs")
    device = next(enc.parameters()).device

    def losses(b):
        z = _embed(enc, [pairs.s1[i] for i in b] + [pairs.s2[i] for i in b], max_len, pooler)  # (2B, D)
        return score_loss(z[:len(b)], z[len(b):], torch.as_tensor(positives(pairs.gold[b], threshold, rule), device=device))

    t0 = time.perf_counter()
    (ga_h, ga_n), (gu_h, gu_n) = _mask_gradients(enc, batches, losses, dropout=dropout_views, progress=progress,
                                                 seed=seed)
    meta = {**_encoder_meta(enc, pooler), "data_fingerprint": data_fingerprint(pairs), "batch_size": batch_size,
            "seed": seed, "threshold": threshold, "positive_rule": rule, "max_pairs": max_pairs,
            "positives": "dropout views" if dropout_views else "labelled pairs",
            "positive_pairs": int(sum(positives(pairs.gold[b], threshold, rule).sum() for b in batches)),
            "num_batches": len(batches), "seconds": round(time.perf_counter() - t0, 3)}
    return Scores(ga_h, gu_h, ga_n, gu_n, meta)


def compute_infonce_scores(enc: Encoder, sentences: list[str], batch_size: int = 64, temperature: float = 0.05,
                           seed: int = 0, max_len: int | None = None, pooler: str | None = None) -> Scores:
    """The SimCSE control: per-batch ∂L_InfoNCE/∂(ξ, ν) of unsupervised SimCSE's own loss (each sentence's two
    dropout views are positives, the batch negatives), as Scores whose two gradient sets are both that gradient,
    so `importance(λ)` = E_b|∂L_InfoNCE/∂mask| for every λ."""
    batches = scoring_batches(len(sentences), batch_size, seed, None, "sentences")

    def losses(b):
        z = _embed(enc, [sentences[i] for i in b] * 2, max_len, pooler)  # the two dropout views: (2B, D)
        return [info_nce(z[:len(b)], z[len(b):], temperature)]

    t0 = time.perf_counter()
    ((gh, gn),) = _mask_gradients(enc, batches, losses, dropout=True, seed=seed)  # dropout makes the two views
    meta = {**_encoder_meta(enc, pooler), "loss": "infonce", "temperature": temperature, "batch_size": batch_size,
            "seed": seed, "num_batches": len(batches), "sentences": sum(len(b) for b in batches),
            "seconds": round(time.perf_counter() - t0, 3)}
    return Scores(gh, gh, gn, gn, meta)


SCORE_COLUMNS = ("batch", "unit", "layer", "index", "g_align", "g_uniform")


def scores_to_bytes(scores: Scores) -> bytes:
    """The Parquet file: one row per (batch, unit, layer, index) with both gradients; metadata in the schema."""
    import pyarrow as pa

    cols = {k: [] for k in SCORE_COLUMNS}
    for unit, ga, gu in ((HEAD, scores.g_align_head, scores.g_uniform_head),
                         (NEURON, scores.g_align_neuron, scores.g_uniform_neuron)):
        nb, L, n = ga.shape
        bb, ll, ii = np.meshgrid(np.arange(nb), np.arange(L), np.arange(n), indexing="ij")
        cols["batch"].append(bb.ravel().astype(np.int32))
        cols["unit"].append(np.full(bb.size, unit, dtype=np.int8))
        cols["layer"].append(ll.ravel().astype(np.int16))
        cols["index"].append(ii.ravel().astype(np.int32))
        cols["g_align"].append(ga.ravel())
        cols["g_uniform"].append(gu.ravel())
    table = pa.table({k: np.concatenate(v) for k, v in cols.items()})
    table = table.replace_schema_metadata({"sparsecse": json.dumps(scores.meta, sort_keys=True)})
    return parquet_bytes(table)


def save_scores(scores: Scores, path: str | os.PathLike) -> Path:
    atomic_write_bytes(path, scores_to_bytes(scores))
    return Path(path)


def load_scores(source: "str | os.PathLike | bytes", expect_fingerprint: str | None = None,
                name: str | None = None) -> Scores:
    """Read a scores file (a path, or its bytes as read from a run's storage; `name` is what errors call it);
    refuse a truncated/corrupt file, one with other columns, or one computed on another model."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(source, bytes):
        path, reader = name or "scores.parquet", pa.BufferReader(source)
    else:
        path = reader = Path(source)
        if not path.is_file():
            raise SparseCSEError(f"{path}: scores file not found; create it with `sparsecse score`")
    try:
        table = pq.read_table(reader)
        meta = json.loads(table.schema.metadata[b"sparsecse"])
    except Exception as e:  # pyarrow raises several types for truncated/corrupt files
        raise SparseCSEError(f"{path}: not a readable sparsecse scores file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'corrupt'}); re-run `sparsecse score`") from None
    missing = [k for k in SCORE_COLUMNS if k not in table.column_names]
    if missing or not all(k in meta for k in ("layers", "heads", "intermediate", "num_batches")):
        raise SparseCSEError(f"{path}: not a sparsecse scores file (missing {', '.join(missing) or 'metadata'}); "
                             "re-run `sparsecse score` to write it")
    if expect_fingerprint is not None and meta.get("model_fingerprint") != expect_fingerprint:
        raise SparseCSEError(f"{path}: scores were computed on another model (fingerprint "
                             f"{str(meta.get('model_fingerprint'))[:12]}… ≠ {expect_fingerprint[:12]}…); "
                             "re-run `sparsecse score` on this model")
    L, H, inter, nb = meta["layers"], meta["heads"], meta["intermediate"], meta["num_batches"]
    c = {k: table.column(k).to_numpy() for k in SCORE_COLUMNS}
    out = []
    for unit, n in ((HEAD, H), (NEURON, inter)):
        sel = c["unit"] == unit
        if sel.sum() != nb * L * n:
            raise SparseCSEError(f"{path}: expected {nb * L * n} rows for unit {unit}, found {int(sel.sum())}; "
                                 "the file is incomplete — re-run `sparsecse score`")
        for g in ("g_align", "g_uniform"):
            arr = np.zeros((nb, L, n))
            arr[c["batch"][sel], c["layer"][sel], c["index"][sel]] = c[g][sel]
            out.append(arr)
    return Scores(out[0], out[1], out[2], out[3], meta)


# --------------------------------------------------------------------------- what the sweep's scoring stage scores

def labelfree_pairs(cfg, data_dir: Path) -> Pairs:
    """score.max_pairs (default 1024) sentences of data.train_file, each paired with itself (two dropout views)."""
    return unlabeled_pairs(train_path(cfg.data.train_file, data_dir), cfg.score.max_pairs or 1024, cfg.score.seed)


def simcse_sentences(cfg, data_dir: Path) -> list[str]:
    """The unlabeled sentences the SimCSE control scores on (as many as the paper's score reads pairs)."""
    return labelfree_pairs(cfg, data_dir).s1


def scoring_pairs(cfg, data_dir: Path) -> tuple[Pairs, int | None]:
    """(the pairs importance is scored on, how many of their unique positive pairs are verbatim STS12–16 test
    pairs — None when that is not measurable here)."""
    if cfg.score.source == "unlabeled":
        return labelfree_pairs(cfg, data_dir), 0
    pairs = load_stsb(data_dir, cfg.score.split)
    used = scoring_order(len(pairs), cfg.score.seed, cfg.score.max_pairs)
    pos = used[positives(pairs.gold[used], cfg.score.positive_threshold, cfg.score.positive_rule)]
    pos_pairs = type(pairs)([pairs.s1[i] for i in pos], [pairs.s2[i] for i in pos], pairs.gold[pos])
    try:
        return pairs, sts_test_overlap(pos_pairs, data_dir)
    except SparseCSEError:  # the STS12–16 files are not needed to score: without them the overlap is unknown
        return pairs, None


def score_importance(enc: Encoder, cfg, data_dir: Path, progress: bool = False) -> tuple[Scores, Pairs]:
    """Every head's and neuron's importance as the config's `score` section asks — label-free (score.source
    unlabeled: each sentence with its second dropout view) or on STS-B pairs (stsb) —, with the label overlap in
    its meta; returns (scores, the pairs read). The sweep's scoring stage and `sparsecse score` both run this."""
    pairs, leak = scoring_pairs(cfg, data_dir)
    unlabeled = cfg.score.source == "unlabeled"
    sc = compute_scores(enc, pairs, batch_size=cfg.score.batch_size,
                        positive=(cfg.score.positive_threshold, cfg.score.positive_rule), seed=cfg.score.seed,
                        max_pairs=None if unlabeled else cfg.score.max_pairs, pooler=cfg.model.eval_pooler,
                        max_len=cfg.train.max_len, dropout_views=unlabeled, progress=progress)
    sc.meta["sts_test_overlap"] = leak
    return sc, pairs
