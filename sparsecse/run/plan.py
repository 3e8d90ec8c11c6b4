"""`sparsecse plan`: what a sweep config will cost before it is submitted — trials, steps, FLOPs, GPU-hours, wall
time, checkpoint bytes and the transfer evaluation — from the model's shape, the corpus and the hardware.

How a figure is reached (and what is measured vs extrapolated):
- FLOPs per step: the encoder's matmuls over the step's real tokens (2 dropout views × batch × mean tokens per
  sentence, padding-free as train.py runs it), forward + backward = 3× forward (`train_flops_per_step`).
- Step time: launch floor + FLOPs ÷ (peak × MFU), plus on data-parallel GPUs the gradient all-reduce (ring, fp32
  gradients over the node's link: NVLink or PCIe; not assumed to overlap the backward pass). `plan` lists stage 1's
  step on 1, 2, 4 … GPUs and recommends the fewest within 10 % of the fastest. On the CPU the peak is a matmul
  measured now, and the MFU (76 %) is BENCHMARKS row 1's. On the H100 the fp32/bf16 peaks and the launch floor (a batch-64 MiniLM step,
  21.4 ms over 6 layers) are BENCHMARKS 5a/5b's; the MFU a compute-bound step reaches on a GPU (50 %) is an
  assumption until benchmarks/gpu_check.py has run on one. A100/L4 use their data-sheet peaks: extrapolated.
- Trials sharing a GPU (sweep.trial_gpus < 1) share its arithmetic: k trials on one GPU take
  max(floor + compute, k × compute) per step each (one's launches overlap the others' compute), so packing pays
  while a step is launch-bound.
- Checkpoints: checkpoints.py's policy — the final best model (1× weights) plus, per resumable checkpoint,
  weights + best + AdamW moments (2× weights); resumable checkpoints = trial minutes ÷ train.checkpoint_every.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .. import SparseCSEError
from ..core.checkpoints import parse_every
from ..core.config import Config
from ..core.results import grid_points
from ..core.staging import is_staged_uri
from ..method.data import train_path
from ..method.model import default_model_path, quiet_transformers, resolve_model_path

KNOWN_SHAPES = {  # (layers, hidden, intermediate, heads, vocab) of the hub models the paper configs name
    "bert-base-uncased": (12, 768, 3072, 12, 30522), "bert-base-cased": (12, 768, 3072, 12, 28996),
    "bert-large-uncased": (24, 1024, 4096, 16, 30522), "bert-large-cased": (24, 1024, 4096, 16, 28996),
    "roberta-base": (12, 768, 3072, 12, 50265), "roberta-large": (24, 1024, 4096, 16, 50265),
    # the other families' deployed sentence encoders (their config.json)
    "sentence-transformers/all-mpnet-base-v2": (12, 768, 3072, 12, 30527),
    "sentence-transformers/paraphrase-multilingual-mpnet-base-v2": (12, 768, 3072, 12, 250002),  # XLM-RoBERTa
    "intfloat/multilingual-e5-base": (12, 768, 3072, 12, 250002),
    "distilbert-base-uncased": (6, 768, 3072, 12, 30522),
    "google/electra-base-discriminator": (12, 768, 3072, 12, 30522),
    "answerdotai/ModernBERT-base": (22, 768, 1152, 12, 50368),
}
KNOWN_CORPORA = {"wiki1m_for_simcse.txt": 1_000_000}  # sentences, when the file is not on this machine
STS_TEST_PAIRS = 3108 + 1500 + 3750 + 3000 + 1186 + 1379 + 4927  # STS12–16, STS-B test, SICK-R test
TRANSFER_SENTENCES = 10662 + 3775 + 10000 + 10606 + 70042 + 5952 + 2 * 5801  # MR CR SUBJ MPQA SST2 TREC MRPC
CPU_MFU = 0.76  # BENCHMARKS row 1 (fifth session): model FLOP/s ÷ same-run matmul peak of our training step
GPU_MFU = 0.50  # assumed for a compute-bound step; gpu_check.py measures it on a lent GPU
LAUNCH_S_PER_LAYER = 0.0214 / 6  # BENCHMARKS 5a: a batch-64 MiniLM step on the H100 (6 layers), launch-bound
UPLOAD_BYTES_S = 200e6  # assumed sustained upload from one node to object storage
# fixed costs (s) of Ray and of a process's start (imports, model load), read off one quickstart sweep on this CPU
# (BENCHMARKS 9: its stage 1 took 29 s for 14 s of steps; the trial processes 28–33 s each); GPU nodes start faster
OVERHEAD_S = {"ray": 5.0, "train": 15.0, "task": 6.0, "trial": 12.0, "report": 5.0}


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_fp32: float  # FLOP/s
    peak_bf16: float
    memory_gb: float
    source: str
    link: str  # how GPUs of one node exchange gradients
    link_bytes_s: float  # per direction, data sheet (an all-reduce reaches somewhat less)


_NVLINK4, _NVLINK3, _PCIE4 = 450e9, 300e9, 25e9  # NVLink 4 / 3 per direction; PCIe 4.0 x16 as reached in practice
GPUS = {
    "h100": Hardware("NVIDIA H100 80GB", 51.3e12, 770e12, 80, "peaks measured on an H100 (BENCHMARKS 5a/5b)",
                     "NVLink 4", _NVLINK4),
    "h200": Hardware("NVIDIA H200 141GB", 51.3e12, 770e12, 141, "the H100's measured peaks (the same GH100 compute)",
                     "NVLink 4", _NVLINK4),
    "a100": Hardware("NVIDIA A100 80GB", 19.5e12, 312e12, 80, "data-sheet peaks (extrapolated, not measured)",
                     "NVLink 3", _NVLINK3),
    "a10g": Hardware("NVIDIA A10G 24GB", 31.2e12, 125e12, 24, "A10 data-sheet peaks (extrapolated, not measured)",
                     "PCIe 4.0 (no NVLink on g5)", _PCIE4),
    "l4": Hardware("NVIDIA L4 24GB", 30.3e12, 121e12, 24, "data-sheet peaks (extrapolated, not measured)",
                   "PCIe 4.0", _PCIE4),
}


def gpu_type(resources: dict) -> str | None:
    """The GPU type a Ray cluster reports (its `accelerator_type:…` resource, e.g. H100, A10G, A100-80G) as one of
    GPUS' keys; None when it reports none or one this plan does not know."""
    for key in resources:
        if key.startswith("accelerator_type:"):
            name = key.split(":", 1)[1].lower()
            for known in sorted(GPUS, key=len, reverse=True):  # a10g before a100's prefix a10
                if name.startswith(known):
                    return known
    return None


def allreduce_s(params: int, world: int, hw: Hardware) -> float:
    """One step's gradient all-reduce across `world` data-parallel GPUs of a node (ring: each sends and receives
    2·(world−1)/world of the fp32 gradients over the link), counted as if it did not overlap the backward pass."""
    if world <= 1:
        return 0.0
    return 2 * (world - 1) / world * 4 * params / hw.link_bytes_s


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int

    @property
    def params(self) -> int:
        """Encoder parameters with the training MLP pooler (what a checkpoint's weights hold)."""
        h, i = self.hidden, self.intermediate
        layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        return self.vocab * h + 514 * h + 2 * h + 2 * h + self.layers * layer + 2 * (h * h + h)

    def fwd_flops_per_token(self, seq: float) -> float:
        h, i = self.hidden, self.intermediate
        return self.layers * (2 * 4 * h * h + 2 * 2 * h * i + 2 * 2 * seq * h)


def model_shape(name: str) -> Shape:
    """The encoder's shape: its config.json when the model is on this machine, else the known hub shapes."""
    import json



    if is_staged_uri(name):  # a staged copy, models/NAME@REVISION: its shape by name (no download to plan)
        base = name.rstrip("/").rsplit("/", 1)[-1].split("@", 1)[0]
        name = next((k for k in KNOWN_SHAPES if k.replace("/", "_") == base), name)
        if name in KNOWN_SHAPES:
            return Shape(*KNOWN_SHAPES[name])
        raise SparseCSEError(f"model.name {name}: a staged model of unknown shape; plan with a local copy")
    cfg_file = Path(resolve_model_path(name)).expanduser() / "config.json"
    if cfg_file.is_file():
        c = json.loads(cfg_file.read_text())
        if c.get("model_type") == "distilbert":  # DistilBERT's own names
            return Shape(c["n_layers"], c["dim"], c["hidden_dim"], c["n_heads"], c["vocab_size"])
        return Shape(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                     c["vocab_size"])
    if name in KNOWN_SHAPES:
        return Shape(*KNOWN_SHAPES[name])
    raise SparseCSEError(f"model.name {name}: its shape is unknown here (no config.json on this machine, not one of "
                         f"{', '.join(KNOWN_SHAPES)}); pass a local model directory")


def corpus_stats(cfg: Config, data_dir: Path | None) -> tuple[int, float, str]:
    """(sentences, mean tokens per sentence after truncation to train.max_len, where they come from)."""
    path = train_path(cfg.data.train_file, data_dir) if data_dir else Path(cfg.data.train_file)
    sample = path if path.is_file() else (data_dir / "wiki" / "wiki1m_sample.txt" if data_dir else None)
    if path.is_file():
        with open(path, "rb") as f:
            n, where = sum(1 for line in f if line.strip()), str(path)
    elif Path(cfg.data.train_file).name in KNOWN_CORPORA:
        n, where = KNOWN_CORPORA[Path(cfg.data.train_file).name], f"{cfg.data.train_file} (known size; not here)"
    else:
        raise SparseCSEError(f"data.train_file {path}: not found; plan needs the corpus (or --data-dir) to count it")
    if cfg.data.max_train_sentences:
        n = min(n, cfg.data.max_train_sentences)
    tokens = mean_tokens(sample, cfg.train.max_len) if sample is not None and sample.is_file() else cfg.train.max_len
    return n, tokens, where


def mean_tokens(path: Path, max_len: int, n: int = 2000) -> float:
    """Mean WordPiece tokens (with [CLS]/[SEP], truncated at max_len) of the first n sentences: the packaged
    MiniLM tokenizer (bert-base-uncased's vocabulary) when installed, else 1.3 tokens per word."""
    with open(path, encoding="utf-8") as f:
        lines = [s for s in (next(f, "").strip() for _ in range(n)) if s]
    try:
        from transformers import AutoTokenizer


        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(default_model_path())
        counts = [len(x) for x in tok(lines, truncation=True, max_length=max_len)["input_ids"]]
    except Exception:  # noqa: BLE001 - no packaged tokenizer: the word-count estimate
        counts = [min(max_len, round(1.3 * len(s.split())) + 2) for s in lines]
    return sum(counts) / max(1, len(counts))


TASK_PAIRS = {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186, "STSBenchmark": 1379,
              "SICKRelatedness": 4927}
EVAL_TOKENS = 16  # mean tokens of an STS sentence (assumed; eval batches are padding-free too)


@dataclass(frozen=True)
class Device:
    """Where one process computes: FLOP/s it reaches, its per-step launch floor, and how many trials share it."""

    flops: float  # attainable FLOP/s (peak × MFU) of this process's share of threads/GPU
    floor_s: float  # launch floor of one training step per layer (0 on the CPU)
    share: int = 1  # processes computing on the same GPU at once

    def step_s(self, flops: float, layers: int) -> float:
        """One process's step: its launch floor plus its compute; processes sharing a GPU overlap one's launches
        with the others' compute, so k of them take max(floor + compute, k × compute) each."""
        compute = flops / self.flops
        return max(self.floor_s * layers + compute, self.share * compute)


def cpu_peak_per_thread() -> float:
    """A single-thread fp32 matmul peak, measured now (FLOP/s)."""
    import time

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(384, 384)
        a @ a
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ a
            best = min(best, (time.perf_counter() - t0) / 4)
    finally:
        torch.set_num_threads(before)
    return 2 * 384 ** 3 / best


@dataclass
class Plan:
    """The figures `render` prints; tests read them directly."""

    model: str
    hardware: str
    params: int
    trials: int
    concurrency: int
    sentences: int
    tokens_per_sentence: float
    steps_stage1: int
    steps_trial: int
    evals_trial: int
    flops_per_step: float
    step_s_stage1: float
    step_s_trial: float
    stage1_s: float
    score_s: float
    trial_s: float
    after_s: float
    wall_s: float
    gpu_hours: float
    checkpoints_trial: int
    upload_bytes_trial: float
    upload_bytes_every_eval: float
    stored_bytes: float
    transfer_models: int
    transfer_sentences: int
    notes: list
    workers: int = 1  # ray.num_workers as configured
    comm_s_stage1: float = 0.0  # of stage 1's step, the gradient all-reduce
    worker_options: list | None = None  # [workers, step seconds, all-reduce seconds] per option
    recommended_workers: int | None = None
    link: str = ""


def _resources(cfg: Config, gpu: str, gpus: int | None, cpus: int | None) -> tuple[int, int, str]:
    """(GPUs, CPUs, the hardware's name and source) the plan assumes."""
    ncpu = cpus or cfg.ray.num_cpus or os.cpu_count() or 1
    if gpu == "cpu":
        return 0, ncpu, f"CPU, {ncpu} cores (matmul peak measured now, MFU {CPU_MFU:.0%} from BENCHMARKS 1)"
    if gpu not in GPUS:
        raise SparseCSEError(f"--gpu {gpu}: unknown; choose from cpu, {', '.join(GPUS)}")
    n = gpus or max(cfg.ray.num_workers if cfg.ray.use_gpu else 1, 1)
    return n, ncpu, f"{n} × {GPUS[gpu].name} ({GPUS[gpu].source}; MFU {GPU_MFU:.0%} assumed)"


def _device(cfg: Config, gpu: str, on_gpu: bool, threads: float, share: int, per_thread: float) -> Device:
    if gpu == "cpu" or not on_gpu:
        return Device(per_thread * max(1.0, threads) * CPU_MFU, 0.0)
    hw = GPUS[gpu]
    peak = hw.peak_bf16 if cfg.train.precision in ("bf16", "auto") else hw.peak_fp32  # auto is bf16 on a GPU
    return Device(peak * GPU_MFU, LAUNCH_S_PER_LAYER, share)


def count_trials(cfg: Config) -> int:

    pts = grid_points(cfg)
    if cfg.sweep.search == "optuna":
        return cfg.sweep.num_samples + sum(1 for p in pts if p.is_control)
    return len(pts)


def _steps(cfg: Config, n: int, world: int) -> int:
    """Optimizer steps of a run (train.global_batches: an epoch's last batch cut to a multiple of the world)."""
    rest = n % cfg.train.batch_size
    rest -= rest % world
    per_epoch = n // cfg.train.batch_size + (1 if rest >= max(2, world) else 0)
    total = per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps is not None else total


def _eval_s(shape: Shape, dev: Device, sentences: float, batch: int) -> float:
    """Encoding `sentences` STS sentences (forward only, batches of `batch`)."""
    flops = shape.fwd_flops_per_token(EVAL_TOKENS) * EVAL_TOKENS * sentences
    return max(dev.floor_s * shape.layers / 3 * math.ceil(sentences / batch), dev.share * flops / dev.flops)


def _checkpoints(cfg: Config, evals: int, train_s: float) -> int:
    """Resumable checkpoints a run takes before its final one (checkpoints.py's policy)."""
    kind, every = parse_every(cfg.train.checkpoint_every)
    due = (evals - 1) // int(every) if kind == "evaluations" else int(train_s // (60 * every))
    return max(0, min(evals - 1, due))


def _step_flops(cfg: Config, shape: Shape, tokens: float) -> float:
    """One SimCSE step's FLOPs: forward + backward (3× forward) over both dropout views of the batch."""
    return 3 * shape.fwd_flops_per_token(tokens) * 2 * cfg.train.batch_size * tokens


def _run_s(cfg: Config, shape: Shape, dev: Device, steps: int, tokens: float, world: int = 1,
           comm_s: float = 0.0) -> dict:
    """One training run (stage 1 or a trial): steps, evaluations, their seconds and its checkpoints."""
    flops = _step_flops(cfg, shape, tokens)
    step_s = dev.step_s(flops / world, shape.layers) + comm_s
    evals = math.ceil(steps / cfg.train.eval_steps)
    dev_s = _eval_s(shape, dev, 2 * (cfg.train.eval_max_pairs or 1500), cfg.eval.batch_size)
    train_s = steps * step_s + evals * dev_s
    ck = _checkpoints(cfg, evals, train_s)
    w = 4 * shape.params  # fp32 weights
    upload = w + ck * (w + w + 2 * w)  # final best + per resumable checkpoint: weights, best, AdamW moments
    every_eval = (evals - 1) * (w + w + 2 * w) + w  # each evaluation's checkpoint, as before the policy
    return {"flops": flops, "step_s": step_s, "evals": evals, "train_s": train_s, "checkpoints": ck,
            "upload": upload, "every_eval": every_eval, "upload_s": upload / UPLOAD_BYTES_S}


def make_plan(cfg: Config, data_dir: Path | None, gpu: str = "cpu", gpus: int | None = None,
              cpus: int | None = None, per_thread: float | None = None) -> Plan:
    """The plan of `cfg` on `gpu` hardware (`gpus` GPUs in the cluster, `cpus` CPU cores for a CPU plan)."""
    ngpu, ncpu, hw_name = _resources(cfg, gpu, gpus, cpus)
    shape = model_shape(cfg.model.name)
    n, tokens, where = corpus_stats(cfg, data_dir)
    on_cpu = gpu == "cpu" or not cfg.sweep.trial_gpus or not cfg.ray.use_gpu  # some stage computes on CPUs
    per_thread = per_thread or (cpu_peak_per_thread() if on_cpu else 0.0)
    sw, world = cfg.sweep, cfg.ray.num_workers
    on_gpu = gpu != "cpu" and sw.trial_gpus > 0
    share = max(1, round(1 / sw.trial_gpus)) if on_gpu and sw.trial_gpus < 1 else 1
    slots = int(ngpu // sw.trial_gpus) if on_gpu else int(ncpu // sw.trial_cpus)
    slots = max(1, min(slots, sw.max_concurrent_trials or slots))
    trials = count_trials(cfg)
    s1_dev = _device(cfg, gpu, gpu != "cpu" and cfg.ray.use_gpu, cfg.ray.cpus_per_worker, 1, per_thread)
    tr_dev = _device(cfg, gpu, on_gpu, sw.trial_cpus, min(share, slots), per_thread)
    hw = GPUS.get(gpu) if gpu != "cpu" and cfg.ray.use_gpu else None
    comm = allreduce_s(shape.params, world, hw) if hw else 0.0
    s1 = _run_s(cfg, shape, s1_dev, _steps(cfg, n, world), tokens, world, comm)
    options = _worker_options(cfg, shape, s1_dev, tokens, ngpu, hw) if hw else []
    tr = _run_s(cfg, shape, tr_dev, _steps(cfg, n, 1), tokens)
    test_s = _eval_s(shape, tr_dev, 2 * sum(TASK_PAIRS.get(t, 0) for t in cfg.eval.tasks), cfg.eval.batch_size)
    trial_s = OVERHEAD_S["trial"] + tr["train_s"] + tr["upload_s"] + test_s
    stage1_s = OVERHEAD_S["train"] + s1["train_s"] + s1["upload_s"]
    score_pairs = cfg.score.max_pairs or 5749
    score_s = OVERHEAD_S["task"] + 3 * _eval_s(shape, tr_dev, 2 * score_pairs, cfg.score.batch_size)
    models = {"none": 0, "selected": 3, "all": trials + 1}[cfg.eval.transfer]
    transfer_s = models * _eval_s(shape, tr_dev, TRANSFER_SENTENCES, cfg.eval.batch_size)
    # the baseline's and the backbone's STS run side by side with the transfer tasks and the export; then the report
    after_s = OVERHEAD_S["task"] + max(test_s, transfer_s) + OVERHEAD_S["report"]
    reps = sw.replicates  # stage-1 runs and scorings, one after the other
    wall = OVERHEAD_S["ray"] + reps * (stage1_s + score_s) + math.ceil(trials / slots) * trial_s + after_s
    gpu_h = ((reps * world * stage1_s if cfg.ray.use_gpu else 0) + trials * trial_s * sw.trial_gpus
             + (reps * score_s + after_s) * sw.trial_gpus) / 3600 if gpu != "cpu" else 0.0
    notes = [f"corpus: {n:,} sentences from {where}, {tokens:.1f} tokens each after truncation"]
    if reps > 1:
        notes.append(f"{reps} stage-1 replicates (sweep.replicates), each trained and scored in turn: the stage-1 "
                     "and scoring figures above are per replicate")
    if share > 1:
        mem = 16 * shape.params / 1e9 + 2 * cfg.train.batch_size * tokens * shape.layers * shape.hidden * 80 / 1e9
        notes.append(f"{share} trials share each GPU (sweep.trial_gpus={sw.trial_gpus:g}); each needs about "
                     f"{mem:.1f} GB (weights, grads, AdamW, activations)")
        if gpu in GPUS and share * mem > GPUS[gpu].memory_gb:
            notes.append(f"WARNING: {share} × {mem:.1f} GB exceeds the {GPUS[gpu].memory_gb:g} GB of one "
                         f"{GPUS[gpu].name}; raise sweep.trial_gpus")
    if models:
        notes.append(f"transfer ({cfg.eval.transfer}): {models} model(s) × 7 tasks; encoding is planned, the "
                     "classifiers' fits are not (MiniLM's took 1.0 min on a 2-core CPU, BENCHMARKS 11)")
    return Plan(cfg.model.name, hw_name, shape.params, trials, slots, n, tokens, _steps(cfg, n, world),
                _steps(cfg, n, 1), tr["evals"], tr["flops"], s1["step_s"], tr["step_s"], stage1_s, score_s, trial_s,
                after_s, wall, gpu_h, tr["checkpoints"], tr["upload"], tr["every_eval"],
                trials * 4 * shape.params, models, models * TRANSFER_SENTENCES, notes, world, comm,
                options, recommend(options), hw.link if hw else "")


def _worker_options(cfg: Config, shape: Shape, dev: Device, tokens: float, ngpu: int, hw: Hardware) -> list:
    """Stage 1's step on 1, 2, 4, 8 … data-parallel GPUs (those the cluster has and the batch divides evenly):
    [workers, step seconds, of which the all-reduce]."""
    flops = _step_flops(cfg, shape, tokens)
    out, w = [], 1
    while w <= max(ngpu, 1):
        if cfg.train.batch_size % w == 0:
            comm = allreduce_s(shape.params, w, hw)
            out.append([w, dev.step_s(flops / w, shape.layers) + comm, comm])
        w *= 2
    return out


def recommend(options: list, within: float = 0.10) -> int | None:
    """The fewest data-parallel workers whose step is within `within` of the fastest option's: more GPUs than that
    buy under 10 % and cost their hours (and, over PCIe, the all-reduce can make them slower outright)."""
    if not options:
        return None
    best = min(s for _, s, _ in options)
    return min(w for w, s, _ in options if s <= best * (1 + within))


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b < 1e12 else f"{b / 1e12:.2f} TB"


def render(p: Plan) -> str:
    rows = [("model", f"{p.model} ({p.params / 1e6:.1f} M parameters)"), ("hardware", p.hardware),
            ("trials", f"{p.trials}, {p.concurrency} at a time"),
            ("stage 1", f"{p.steps_stage1:,} steps × {p.step_s_stage1 * 1e3:.0f} ms → {_dur(p.stage1_s)}"
                        + (f" ({p.workers} data-parallel GPUs; all-reduce {p.comm_s_stage1 * 1e3:.0f} ms of each step "
                           f"over {p.link})" if p.workers > 1 and p.link else "")),
            ("per trial", f"{p.steps_trial:,} steps × {p.step_s_trial * 1e3:.0f} ms, {p.evals_trial} evaluations "
                          f"→ {_dur(p.trial_s)}"),
            ("FLOPs per step", f"{p.flops_per_step / 1e9:.1f} GFLOP (forward + backward, 2 views)"),
            ("scoring / after the trials", f"{_dur(p.score_s)} / {_dur(p.after_s)}"),
            ("wall time", _dur(p.wall_s)), ("GPU-hours", f"{p.gpu_hours:.1f}"),
            ("checkpoint uploads per trial", f"{_gb(p.upload_bytes_trial)} ({p.checkpoints_trial} resumable + the "
                                             f"final; every evaluation would be {_gb(p.upload_bytes_every_eval)})"),
            ("checkpoints stored after the sweep", _gb(p.stored_bytes)),
            ("transfer evaluation", f"{p.transfer_models} model(s), {p.transfer_sentences:,} sentences encoded")]
    if p.worker_options:
        rows.insert(4, ("stage 1 by GPU count", ", ".join(f"{w}: {t * 1e3:.0f} ms/step" + (f" ({c * 1e3:.0f} ms "
                                                            "all-reduce)" if c else "") for w, t, c in p.worker_options)
                        + f" → recommended ray.num_workers: {p.recommended_workers}"
                        + ("" if p.recommended_workers == p.workers else f" (configured: {p.workers})")))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"[plan] {k.ljust(width)}  {v}" for k, v in rows] + [f"[plan] note: {n}" for n in p.notes])
