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
from typing import Callable, Sequence

import numpy as np
import torch

from .. import SparseCSEError
from ..core.checkpoints import META_FILE, CheckpointPolicy
from ..core.config import Config
from ..core.io import atomic_dir, atomic_write_bytes, atomic_write_text, link_or_copy, verify_manifest
from ..core.results import DEV, LAST_DEV
from .data import collate, load_corpus, selection_pairs, train_path
from .evaluate import evaluate_pairs
from .losses import info_nce
from .model import Encoder, load_encoder, save_encoder, weights_fingerprint


@dataclass
class Dist:
    """Where this process trains: its rank among `world_size` data-parallel workers, its device, and how the
    driver wraps the encoder for data parallelism (`wrap`, e.g. DDP). The default is one process on the CPU."""

    rank: int = 0
    world_size: int = 1
    device: str | torch.device = "cpu"
    wrap: Callable[[Encoder], torch.nn.Module] | None = None

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


def dev_pairs(data_dir: Path, max_pairs: int | None, seed: int = 0, select_on: str = "stsb-dev"):
    """The dev pairs every evaluation reads (sweep.select_on), subsampled to `max_pairs` (train.eval_max_pairs)."""
    pairs = selection_pairs(data_dir, select_on)
    if max_pairs is not None and max_pairs < len(pairs):
        idx = np.random.default_rng(seed).permutation(len(pairs))[:max_pairs]
        pairs = pairs.subset(sorted(idx))
    return pairs


def global_batches(n: int, batch_size: int, epochs: int, seed: int, world: int = 1):
    """The global batch order: a seeded permutation per epoch. An epoch's last short batch is cut to a multiple of
    the `world` size, so every rank gets a slice of the same size (the all-gather of negatives needs equal sizes on
    every rank, with gloo and NCCL alike): at most world − 1 sentences of an epoch are left out, none with one
    worker. A batch is kept when it has ≥ 2 sentences (and ≥ 1 per rank)."""
    for ep in range(epochs):
        perm = np.random.default_rng(seed + ep).permutation(n)
        for i in range(0, n, batch_size):
            b = perm[i:i + batch_size]
            b = b[:len(b) - len(b) % world]
            if len(b) >= max(2, world):
                yield b


def rank_slice(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's equal share of a global batch (its length is a multiple of `world`: `global_batches`)."""
    per = len(batch) // world
    return batch[rank * per:(rank + 1) * per]


class Callback:
    """Hooks into a training run; override what you need. stages.py installs the ones named in
    SPARSECSE_CALLBACKS (the reliability tests inject their faults this way) and Ray's reporter last."""

    def on_train_start(self, model: Encoder, optimizer: torch.optim.Optimizer) -> None:
        pass

    def on_report(self, metrics: dict, checkpoint: Path | None) -> None:
        """After each evaluation; `checkpoint` is rank 0's `latest/` (None on other ranks)."""


class OnReport(Callback):
    """A callback from a plain function `fn(metrics, checkpoint)`."""

    def __init__(self, fn: Callable[[dict, Path | None], None]):
        self.fn = fn

    def on_report(self, metrics: dict, checkpoint: Path | None) -> None:
        self.fn(metrics, checkpoint)


@dataclass
class TrainState:
    """Where a run is, beyond its weights: the step, the best dev score, the evaluations so far and the steps a
    run was resumed at. Saved with the optimizer, the schedule and the dropout RNG as `trainer_state.pt`."""

    step: int = 0
    best_dev: float = -math.inf
    history: list[dict] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)

    def save(self, path: Path, opt, sched) -> None:
        """`opt`/`sched` None: a finished run's state, which nothing will train further (no optimizer moments)."""
        import io

        buf = io.BytesIO()
        torch.save({**({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()} if opt is not None else {}),
                    "step": self.step, "best_dev": self.best_dev, "history_json": json.dumps(self.history),
                    "resumed_at": self.resumed_at,
                    "rng": torch.get_rng_state()}, buf)  # dropout stream: a resumed run continues it exactly
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def restore(cls, ckpt: Path, opt, sched, total: int) -> "TrainState":
        """From a `latest/` checkpoint: optimizer, schedule and RNG restored in place; this resume recorded. A
        finished run's final checkpoint has no optimizer state: it resumes only to its own last step (`total`)."""
        st = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        step = int(st["step"])
        if "optimizer" in st:
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
        elif step < total:
            raise SparseCSEError(f"{ckpt} is the final checkpoint of a run that ended at step {step}; it cannot "
                                 f"train on to step {total} (no optimizer state): start a new run from its best/ "
                                 "instead")
        torch.set_rng_state(st["rng"])
        return cls(step=step, best_dev=float(st["best_dev"]), history=json.loads(st["history_json"]),
                   resumed_at=[*st.get("resumed_at", []), step])


def save_checkpoint(out_dir: Path, enc: Encoder, state: TrainState, opt, sched, *, best_is_current: bool = False,
                    final: bool = False) -> Path:
    """`latest/` = {model/, trainer_state.pt, history.json, best/}: all a resume needs, written atomically.
    best/ is hard-linked from OUT/best (its files never change once written), not copied. Left out (a trial's
    checkpoints are most of a sweep's storage): model/ when best/ holds this very step's weights
    (`best_is_current`; `checkpoint_weights` resolves either), and the `final` checkpoint's model/ and optimizer
    state: nothing trains on from it, and what a run delivers is its best/."""
    import shutil


    with atomic_dir(out_dir / "latest") as tmp:
        if not best_is_current and not final:
            save_encoder(enc, tmp / "model", {"step": state.step})
        state.save(tmp / "trainer_state.pt", None if final else opt, None if final else sched)
        (tmp / "history.json").write_text(json.dumps({"history": state.history, "resumed_at": state.resumed_at},
                                                     indent=1))
        if (out_dir / "best").is_dir():
            shutil.copytree(out_dir / "best", tmp / "best", copy_function=link_or_copy)
    return out_dir / "latest"


def checkpoint_weights(ckpt: Path) -> Path:
    """The weights a `latest/` checkpoint was taken at: its model/, or its best/ when they were the same."""
    ckpt = Path(ckpt)
    return ckpt / "model" if (ckpt / "model").is_dir() else ckpt / "best"


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


def linear_schedule(opt, total: int):
    """Linear decay to 0 over `total` steps, no warm-up (SimCSE's)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))


def resolve_precision(precision: str, device) -> str:
    """What train.precision means on `device`: "auto" is bf16 autocast on CUDA (with TF32 for what stays fp32 —
    the loss, the optimizer's matmul-free update — and for any fp32 matmul), fp32 elsewhere; "fp32" on CUDA turns
    TF32 off so fp32 means fp32. Sets torch's TF32 switches accordingly and returns "fp32" or "bf16"."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


def train_step(model, opt, sched, batch: dict, tc, device, gather, precision: str = "fp32") -> float:
    """One optimizer step on this rank's slice of the global batch (`precision` as resolve_precision gives it);
    returns the loss."""
    loss = simcse_loss(model, batch, tc.temperature, device, gather, precision)
    if not torch.isfinite(loss):
        raise SparseCSEError(f"training loss became non-finite ({loss.item()}); lower train.lr or check the data")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def evaluate_and_checkpoint(enc: Encoder, state: TrainState, dev, cfg: Config, out_dir: Path, meta: dict,
                            opt, sched, loss: float, checkpoint: str | None = "final") -> tuple[dict, Path | None]:
    """Rank 0: STS-B dev Spearman; a new best is saved as OUT/best; OUT/latest is rewritten when a `checkpoint`
    falls due ("resumable", or "final": the run's last one, without optimizer state). Returns the record and the
    checkpoint (None when none was due)."""
    dev_score = evaluate_pairs(enc, dev, pooler=cfg.model.eval_pooler)
    new_best = dev_score > state.best_dev
    if new_best:
        state.best_dev = dev_score
        save_encoder(enc, out_dir / "best", {**meta, "step": state.step, LAST_DEV: dev_score,
                                             "config": cfg.to_dict()})
    rec = {"step": state.step, "loss": loss, LAST_DEV: dev_score, DEV: state.best_dev}
    state.history.append(rec)
    if checkpoint is None:
        return rec, None
    return rec, save_checkpoint(out_dir, enc, state, opt, sched, best_is_current=new_best,
                                final=checkpoint == "final")


class _Log:
    """Rank 0's progress bar and TensorBoard scalars (either may be off)."""

    def __init__(self, total: int, step: int, tb_dir: Path | None, progress: bool):
        self.writer = self.bar = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tb_dir))
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=step, desc="simcse", unit="step")

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def eval(self, step: int, dev: float) -> None:
        if self.writer:
            self.writer.add_scalar("eval/stsb_dev", dev, step)
            self.writer.flush()  # on disk at every evaluation: callbacks may ship it to storage now

    def close(self) -> None:
        for x in (self.bar, self.writer):
            if x:
                x.close()


def _start_model(cfg: Config, init: str | Encoder | None, resume_dir: Path | None) -> Encoder:
    """The model to train: the resumed checkpoint's (masks included), else `init`, else cfg.model.name."""
    if resume_dir is not None:
        weights = checkpoint_weights(resume_dir)
        verify_manifest(weights)
        return load_encoder(str(weights), pooler=cfg.model.pooler, dropout=cfg.train.dropout)
    if isinstance(init, Encoder):
        return init
    return load_encoder(init or cfg.model.name, pooler=cfg.model.pooler, dropout=cfg.train.dropout)


def _run_meta(cfg: Config, enc: Encoder, meta: dict | None, resume_dir: Path | None, out_dir: Path) -> dict:
    """What every best/ checkpoint records: the starting weights' fingerprint (kept across resumes)."""
    meta = dict(meta or {})
    if resume_dir is None:
        meta.setdefault("init_fingerprint", weights_fingerprint(enc))
    elif (out_dir / "best" / META_FILE).exists():
        meta.setdefault("init_fingerprint", json.loads((out_dir / "best" / META_FILE).read_text()).get("init_fingerprint"))
    meta.setdefault("eval_pooler", cfg.model.eval_pooler)
    return meta


def _corpus(cfg: Config, data_dir: Path, tokenizer):
    corpus = load_corpus(train_path(cfg.data.train_file, data_dir), tokenizer, cfg.train.max_len,
                         cfg.data.max_train_sentences)
    if cfg.train.batch_size > len(corpus):
        raise SparseCSEError(f"train.batch_size={cfg.train.batch_size} is larger than the corpus ({len(corpus)} "
                             "sentences); lower it or use a larger corpus")
    return corpus


def _resume_best(resume_dir: Path, out_dir: Path) -> None:
    """A checkpoint restored into another directory brings its best/ along."""
    import shutil

    if (resume_dir / "best").is_dir() and resume_dir.resolve() != (out_dir / "latest").resolve():
        shutil.rmtree(out_dir / "best", ignore_errors=True)
        shutil.copytree(resume_dir / "best", out_dir / "best")


def train_simcse(cfg: Config, out_dir: str | os.PathLike, data_dir: Path, *, init: str | Encoder | None = None,
                 dist: Dist | None = None, callbacks: Sequence[Callback] = (), resume_dir: Path | None = None,
                 tb_dir: Path | None = None, progress: bool = True, meta: dict | None = None) -> TrainResult:
    """Train SimCSE from `init` (an Encoder with its masks set, a model name/dir; default cfg.model.name), keeping
    the best STS-B dev model in OUT/best and a resumable OUT/latest whenever train.checkpoint_every falls due
    (and at the end); callbacks hear every evaluation, with the checkpoint when one was written.

    `dist` places the run (rank, world size, device, DDP wrapping); `resume_dir` continues from a `latest/`.
    """
    tc, dist, out_dir = cfg.train, dist or Dist(), Path(out_dir)
    device, wrap = dist.device, dist.wrap
    if tc.batch_size % dist.world_size:
        raise SparseCSEError(f"train.batch_size={tc.batch_size} is not divisible by {dist.world_size} workers; "
                             "the global batch is split evenly")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed * 1000 + dist.rank)  # dropout stream (MLP init is seeded separately)
    enc = _start_model(cfg, init, resume_dir)
    meta = _run_meta(cfg, enc, meta, resume_dir, out_dir)
    enc.to(device).train()
    precision = resolve_precision(tc.precision, device)
    model = wrap(enc) if wrap else enc
    corpus = _corpus(cfg, data_dir, enc.tokenizer)
    total = sum(1 for _ in global_batches(len(corpus), tc.batch_size, 1, tc.seed, dist.world_size)) * tc.epochs
    total = min(total, tc.max_steps) if tc.max_steps is not None else total
    dev = dev_pairs(data_dir, tc.eval_max_pairs, select_on=cfg.sweep.select_on)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], tc.lr, tc.weight_decay, device)
    sched = linear_schedule(opt, total)
    state = TrainState()
    if resume_dir is not None:
        _resume_best(resume_dir, out_dir)
        state = TrainState.restore(resume_dir, opt, sched, total)
    for cb in callbacks:
        cb.on_train_start(enc, opt)

    main = dist.rank == 0
    policy = CheckpointPolicy(tc.checkpoint_every)
    log = _Log(total, state.step, tb_dir if main else None, progress and main)
    pad = enc.tokenizer.pad_token_id or 0
    seen, t_train = 0, 0.0
    for i, gb in enumerate(global_batches(len(corpus), tc.batch_size, tc.epochs, tc.seed, dist.world_size)):
        if i >= total:
            break
        if i < state.step:  # resumed: skip batches already trained on
            continue
        t0 = time.perf_counter()
        local = rank_slice(gb, dist.rank, dist.world_size)
        loss = train_step(model, opt, sched, collate([corpus[int(j)] for j in local], pad), tc, device, dist.gather,
                          precision)
        state.step += 1
        t_train += time.perf_counter() - t0
        seen += len(gb)
        log.step(state.step, loss, sched.get_last_lr()[0])
        if state.step % tc.eval_steps == 0 or state.step == total:
            rec, ckpt = {"step": state.step, "loss": loss, LAST_DEV: float("nan")}, None
            if main:
                last = state.step == total
                rec, ckpt = evaluate_and_checkpoint(enc, state, dev, cfg, out_dir, meta, opt, sched, loss,
                                                    ("final" if last else "resumable") if policy.due(last) else None)
                log.eval(state.step, rec[LAST_DEV])
            rec["last"] = state.step == total  # the final evaluation of this training run
            dist.barrier()
            for cb in callbacks:
                cb.on_report(rec, ckpt)
    log.close()
    if main:
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    best = out_dir / "best"
    return TrainResult(best_dir=best if best.is_dir() else None, best_dev=state.best_dev, steps=state.step,
                       history=state.history, sentences_per_s=seen / t_train if t_train else 0.0)
