"""Unsupervised SimCSE training (Gao et al. 2021; SparseCSE §2.1) as a plain torch loop, no Ray.

Each sentence passes the encoder twice with dropout on (one forward of the doubled batch); the two views
are positives, the rest of the *global* batch negatives. Under data parallelism each worker takes its
slice of the same global batch and embeddings are all-gathered with gradients, so the contrastive batch
— and the result — does not depend on the worker count (`Dist`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import SparseCSEError
from .config import Config
from .data import collate, load_corpus, load_stsb
from .evaluate import evaluate_pairs
from .io import atomic_write_bytes, atomic_write_text, verify_manifest
from .losses import info_nce
from .model import Encoder, load_encoder, save_encoder, weights_fingerprint


@dataclass
class Dist:
    """Data-parallel context; the default is a single process."""

    rank: int = 0
    world_size: int = 1

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        import torch.distributed.nn.functional as dfn

        return torch.cat(dfn.all_gather(x), dim=0)  # keeps gradients to every rank's slice

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


@dataclass
class TrainResult:
    best_dir: Path | None
    best_dev: float
    steps: int
    history: list[dict] = field(default_factory=list)
    sentences_per_s: float = 0.0


def dev_pairs(data_dir: Path, max_pairs: int | None, seed: int = 0):
    pairs = load_stsb(data_dir, "dev")
    if max_pairs is not None and max_pairs < len(pairs):
        idx = np.random.default_rng(seed).permutation(len(pairs))[:max_pairs]
        pairs = pairs.subset(sorted(idx))
    return pairs


def global_batches(n: int, batch_size: int, epochs: int, seed: int):
    """The global batch order: a seeded permutation per epoch, the last short batch kept if it has ≥ 2."""
    for ep in range(epochs):
        perm = np.random.default_rng(seed + ep).permutation(n)
        for i in range(0, n, batch_size):
            b = perm[i:i + batch_size]
            if len(b) >= 2:
                yield b


def _save_state(path: Path, opt, sched, step: int, best_dev: float, history: list) -> None:
    import io as _io

    buf = _io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                "best_dev": best_dev, "history_json": json.dumps(history),
                "rng": torch.get_rng_state()}, buf)  # dropout stream: a resumed run continues it exactly
    atomic_write_bytes(path, buf.getvalue())


def _save_latest(out_dir: Path, enc: Encoder, opt, sched, step: int, best_dev: float, history: list,
                 resumes: list) -> Path:
    """`latest/` = {model/, trainer_state.pt, history.json, best/}: everything needed to resume, written atomically."""
    import shutil

    from .io import atomic_dir

    with atomic_dir(out_dir / "latest") as tmp:
        save_encoder(enc, tmp / "model", {"step": step})
        _save_state(tmp / "trainer_state.pt", opt, sched, step, best_dev, history)
        (tmp / "history.json").write_text(json.dumps({"history": history, "resumed_at": resumes}, indent=1))
        if (out_dir / "best").is_dir():
            shutil.copytree(out_dir / "best", tmp / "best")
    return out_dir / "latest"


def make_optimizer(params, lr: float, weight_decay: float, device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over all tensors, ~5× faster than foreach on CPU) where torch has it."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=torch.device(device).type in ("cpu", "cuda"))
    except (RuntimeError, ValueError):  # a device type without a fused AdamW
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def simcse_loss(model, batch: dict, temperature: float, device="cpu", gather=lambda z: z,
                precision: str = "fp32") -> torch.Tensor:
    """Unsupervised SimCSE on one (local) batch: both dropout views in one doubled forward, InfoNCE over the
    global batch (`gather` concatenates the views of every data-parallel rank, keeping this rank's gradients).
    precision="bf16" runs the encoder under bfloat16 autocast; the similarities and the loss stay fp32."""
    ids = batch["input_ids"].repeat(2, 1).to(device)  # (2b, T): two dropout views in one forward
    att = batch["attention_mask"].repeat(2, 1).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        z = model(ids, att)  # (2b, D)
    z = z.float()
    b = batch["input_ids"].shape[0]
    return info_nce(gather(z[:b]), gather(z[b:]), temperature)


def train_simcse(cfg: Config, out_dir: str | os.PathLike, data_dir: Path, *, init: str | Encoder | None = None,
                 head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None,
                 dist: Dist | None = None, device: str | torch.device = "cpu",
                 wrap: Callable[[Encoder], torch.nn.Module] | None = None,
                 report: Callable[[dict, Path | None], None] | None = None,
                 resume_dir: Path | None = None, tb_dir: Path | None = None, progress: bool = True,
                 meta: dict | None = None) -> TrainResult:
    """Train SimCSE from `init` (default cfg.model.name) with optional fixed masks; keep the best STS-B dev model.

    `wrap` lets a data-parallel driver wrap the encoder (e.g. DDP); `report(metrics, checkpoint_dir)` is
    called at every evaluation with the latest checkpoint; `resume_dir` continues from such a checkpoint.
    """
    tc, dist = cfg.train, dist or Dist()
    out_dir = Path(out_dir)
    if tc.batch_size % dist.world_size:
        raise SparseCSEError(f"train.batch_size={tc.batch_size} is not divisible by {dist.world_size} workers; "
                             "the global batch is split evenly")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed * 1000 + dist.rank)  # dropout stream (MLP init is seeded separately)
    start_from = str(resume_dir / "model") if resume_dir is not None else init
    if isinstance(start_from, Encoder):
        enc = start_from
    else:
        enc = load_encoder(start_from or cfg.model.name, pooler=cfg.model.pooler, dropout=tc.dropout)
    if head_mask is not None or neuron_mask is not None:
        enc.set_masks(head_mask, neuron_mask)
    meta = dict(meta or {})
    if resume_dir is None:
        meta.setdefault("init_fingerprint", weights_fingerprint(enc))
    elif (out_dir / "best" / "sparsecse.json").exists():
        meta.setdefault("init_fingerprint", json.loads((out_dir / "best" / "sparsecse.json").read_text()).get("init_fingerprint"))
    meta.setdefault("eval_pooler", cfg.model.eval_pooler)
    enc.to(device).train()
    model = wrap(enc) if wrap else enc

    corpus = load_corpus(Path(data_dir) / cfg.data.train_file if not os.path.isabs(cfg.data.train_file)
                         else Path(cfg.data.train_file), enc.tokenizer, tc.max_len, cfg.data.max_train_sentences)
    if tc.batch_size > len(corpus):
        raise SparseCSEError(f"train.batch_size={tc.batch_size} is larger than the corpus ({len(corpus)} sentences); "
                             "lower it or use a larger corpus")
    steps_per_epoch = sum(1 for _ in global_batches(len(corpus), tc.batch_size, 1, tc.seed))
    total = steps_per_epoch * tc.epochs
    if tc.max_steps is not None:
        total = min(total, tc.max_steps)
    dev = dev_pairs(data_dir, tc.eval_max_pairs)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, tc.lr, tc.weight_decay, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))  # linear decay, no warmup
    step, best_dev, history, resumes = 0, -math.inf, [], []
    if resume_dir is not None:
        verify_manifest(resume_dir / "model")
        if (resume_dir / "best").is_dir() and resume_dir.resolve() != (out_dir / "latest").resolve():
            import shutil

            shutil.rmtree(out_dir / "best", ignore_errors=True)
            shutil.copytree(resume_dir / "best", out_dir / "best")
        st = torch.load(resume_dir / "trainer_state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, best_dev, history = int(st["step"]), float(st["best_dev"]), json.loads(st["history_json"])
        torch.set_rng_state(st["rng"])
        hist_file = resume_dir / "history.json"
        resumes = (json.loads(hist_file.read_text())["resumed_at"] if hist_file.exists() else []) + [step]

    writer = None
    if tb_dir is not None and dist.rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(tb_dir))
    pad = enc.tokenizer.pad_token_id or 0
    bar = None
    if progress and dist.rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc="simcse", unit="step")
    lo, hi = dist.rank * tc.batch_size // dist.world_size, (dist.rank + 1) * tc.batch_size // dist.world_size
    seen, t_train, best_dir = 0, 0.0, (out_dir / "best") if (out_dir / "best").exists() else None
    loss_v = float("nan")
    for i, gb in enumerate(global_batches(len(corpus), tc.batch_size, tc.epochs, tc.seed)):
        if i >= total:
            break
        if i < step:  # resumed: skip batches already trained on
            continue
        t0 = time.perf_counter()
        local = gb[lo * len(gb) // tc.batch_size: hi * len(gb) // tc.batch_size]
        batch = collate([corpus[int(j)] for j in local], pad)
        loss = simcse_loss(model, batch, tc.temperature, device, dist.gather, tc.precision)
        if not torch.isfinite(loss):
            raise SparseCSEError(f"training loss became non-finite ({loss.item()}) at step {step}; "
                                 "lower train.lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        loss_v = loss.item()
        t_train += time.perf_counter() - t0
        seen += len(gb)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4f}")
        if writer:
            writer.add_scalar("train/loss", loss_v, step)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
        if step % tc.eval_steps == 0 or step == total:
            rec = {"step": step, "loss": loss_v, "stsb_dev": float("nan")}
            ckpt = None
            if dist.rank == 0:
                dev_score = evaluate_pairs(enc, dev, pooler=cfg.model.eval_pooler)
                rec["stsb_dev"] = dev_score
                if dev_score > best_dev:
                    best_dev = dev_score
                    best_dir = save_encoder(enc, out_dir / "best", {**meta, "step": step, "stsb_dev": dev_score,
                                                                    "config": cfg.to_dict()})
                rec["best_stsb_dev"] = best_dev
                history.append(rec)
                ckpt = _save_latest(out_dir, enc, opt, sched, step, best_dev, history, resumes)
                if writer:
                    writer.add_scalar("eval/stsb_dev", dev_score, step)
            dist.barrier()
            if report:
                report(rec, ckpt)
    if bar:
        bar.close()
    if writer:
        writer.close()
    if dist.rank == 0:
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    return TrainResult(best_dir=best_dir, best_dev=best_dev, steps=step, history=history,
                       sentences_per_s=seen / t_train if t_train else 0.0)
