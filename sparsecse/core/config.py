"""Typed, frozen run configuration: one YAML per run (model/data/train/score/eval/sweep/ray sections).

`load_config(path, overrides)` reads the YAML, applies `--set section.key=value` overrides and
validates everything before any compute starts; a bad key or value raises SparseCSEError naming it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from .. import SparseCSEError
from .checkpoints import parse_every

Pooler = Literal["cls", "cls_before_pooler", "avg"]
POOLERS: tuple[str, ...] = get_args(Pooler)
Precision = Literal["auto", "fp32", "bf16"]
# align_uniform: the paper's Taylor score of λ·L_align + (1−λ)·L_uniform; random: a seeded random ranking (one
# draw per seed); magnitude: the L2 norm of each head's / neuron's weights in the pre-trained model; simcse: the
# Taylor score of SimCSE's own InfoNCE loss (two dropout views of unlabeled sentences) — is the paper's objective
# better than the one the model was trained with?
Scorer = Literal["align_uniform", "random", "magnitude", "simcse"]
CONTROL_SCORERS = ("random", "magnitude", "simcse")
SCORERS: tuple[str, ...] = get_args(Scorer)
Combine = Literal["gradient", "score"]
Normalize = Literal["none", "layer"]
STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")
TRANSFER_TASKS = ("MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC")
# The paper's grid (§3.1): sparsity 0 (rewound SimCSE control), 1..10 %, 20..50 %; λ ∈ {0.25, 0.5, 0.75}.
PAPER_SPARSITIES = (0.0,) + tuple(round(0.01 * i, 2) for i in range(1, 11)) + (0.2, 0.3, 0.4, 0.5)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise SparseCSEError(f"config {key}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "minilm"  # "minilm" = packaged all-MiniLM-L6-v2; or a hub name / local directory
    pooler: Pooler = "cls"  # training pooler: CLS + MLP (SimCSE)
    eval_pooler: Pooler = "cls_before_pooler"  # evaluation pooler: CLS without MLP (SimCSE)

    def __post_init__(self):
        _check(bool(self.name), "model.name", "must name a model (e.g. minilm, bert-base-uncased or a directory)")


@dataclass(frozen=True)
class DataConfig:
    dir: str | None = None  # data dir: --data-dir, then SPARSECSE_DATA_DIR, then ~/.cache/sparsecse/data
    train_file: str = "wiki/wiki1m_sample.txt"  # relative to the data dir, or absolute
    max_train_sentences: int | None = None

    def __post_init__(self):
        _check(self.max_train_sentences is None or self.max_train_sentences > 0, "data.max_train_sentences",
               "must be a positive integer or null")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    max_len: int = 32
    lr: float = 3e-5
    epochs: int = 1
    max_steps: int | None = None  # cap on optimizer steps (budgets on CPU)
    temperature: float = 0.05
    eval_steps: int = 125  # STS-B dev evaluation every N steps (and at the end)
    # a resumable checkpoint (weights + AdamW state) every N evaluations (an integer) or at the first evaluation
    # after M minutes ("30m"), and one at the end; bytes uploaded do not grow with the evaluations (checkpoints.py)
    checkpoint_every: int | str = "30m"
    eval_max_pairs: int | None = None  # subsample STS-B dev for selection (None = all 1,500 pairs)
    seed: int = 42
    weight_decay: float = 0.0
    dropout: float | None = None  # None keeps the backbone's own dropout
    threads: int | None = None
    # auto: bf16 autocast with TF32 matmuls on CUDA, fp32 elsewhere; fp32: strict fp32 everywhere (TF32 off);
    # bf16: the forward under bfloat16 autocast anywhere (GPUs; CPUs with AMX/AVX-512-bf16)
    precision: Precision = "auto"

    def __post_init__(self):
        _check(self.batch_size >= 2, "train.batch_size", f"must be >= 2 (got {self.batch_size}); contrastive "
               "learning needs in-batch negatives")
        _check(self.max_len >= 4, "train.max_len", "must be >= 4")
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr", "must be a positive number")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1 or null")
        _check(self.temperature > 0, "train.temperature", "must be > 0")
        _check(self.eval_steps >= 1, "train.eval_steps", "must be >= 1")
        parse_every(self.checkpoint_every)  # one line naming the key when neither evaluations nor minutes
        _check(self.eval_max_pairs is None or self.eval_max_pairs >= 10, "train.eval_max_pairs", "must be >= 10 or null")
        _check(self.dropout is None or 0 <= self.dropout < 1, "train.dropout", "must be in [0, 1) or null")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")


@dataclass(frozen=True)
class ScoreConfig:
    # where positives come from: "unlabeled" (the default: label-free, two dropout views of data.train_file
    # sentences, as SimCSE trains; score.max_pairs sentences, default 1024) or "stsb" (the paper's setting, which
    # sweeps/paper-*.yaml keep: STS-B pairs with high gold scores — labels, and STS-B train repeats many STS12–16
    # test pairs)
    source: Literal["stsb", "unlabeled"] = "unlabeled"
    split: Literal["train", "dev", "test"] = "train"  # STS-B split the importance scores are computed on
    batch_size: int = 64  # pairs per batch
    max_pairs: int | None = None
    positive_threshold: float = 4.0  # STS-B pairs scored above it are positives for L_align
    # "gt": gold > threshold, SimCSE §5's "pairs with a score higher than 4" (Gao et al. 2021); "ge": gold >= it
    positive_rule: Literal["gt", "ge"] = "gt"
    seed: int = 0
    # how the two objectives and the layers meet (the paper leaves both open; see score.importance). A list is a
    # sweep grid dimension (e.g. normalize: [none, layer] runs both readings side by side):
    combine: tuple[Combine, ...] = ("gradient",)  # E|λ·g_align + (1−λ)·g_uniform| | λ·E|g_align| + (1−λ)·E|g_uniform|
    normalize: tuple[Normalize, ...] = ("none",)  # "layer": each layer's scores L2-normalised before ranking (StarK)
    # instead of every combine × normalize: exactly these [combine, normalize] readings of the paper's score, e.g.
    # [[gradient, none], [score, layer]] (the paper's formula and StarK's); the controls run under each normalize
    # among them. combine and normalize then list the values these use.
    readings: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self):
        _check(self.batch_size >= 2, "score.batch_size", "must be >= 2")
        if self.readings is not None:
            _check(len(self.readings) > 0 and len(set(map(tuple, self.readings))) == len(self.readings)
                   and all(len(r) == 2 and r[0] in ("gradient", "score") and r[1] in ("none", "layer")
                           for r in self.readings), "score.readings",
                   "a list of distinct [combine, normalize] pairs, combine gradient|score, normalize none|layer")
            _check(tuple(dict.fromkeys(r[0] for r in self.readings)) == tuple(self.combine)
                   and tuple(dict.fromkeys(r[1] for r in self.readings)) == tuple(self.normalize), "score.readings",
                   "set score.combine and score.normalize to the values the readings use, in their order")
        _check(self.max_pairs is None or self.max_pairs >= 2, "score.max_pairs", "must be >= 2 or null")
        for key in ("combine", "normalize"):
            v = getattr(self, key)
            _check(len(v) > 0 and len(set(v)) == len(v), f"score.{key}", "needs at least one value, each once")

    def single(self, key: str, command: str) -> str:
        """The one value of score.combine / score.normalize a command that builds one mask uses."""
        v = getattr(self, key)
        _check(len(v) == 1, f"score.{key}", f"{command} builds one mask, so it takes one value (got {list(v)}); "
               f"pass e.g. --set score.{key}={v[0]}")
        return v[0]

    def allocations(self, scorer: str) -> list[tuple[str, str]]:
        """The (combine, normalize) readings a scorer runs under: combine is about the paper's two objectives, so
        the control scorers (one score each) take only its first value; normalize applies to every scorer."""
        if self.readings is not None:
            if scorer == "align_uniform":
                return [tuple(r) for r in self.readings]
            return [(self.combine[0], n) for n in self.normalize]
        combines = self.combine if scorer == "align_uniform" else self.combine[:1]
        return [(c, n) for c in combines for n in self.normalize]


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = STS_TASKS
    batch_size: int = 128
    max_len: int | None = None  # None: no truncation beyond the model's limit (SentEval protocol)
    # the 7 transfer tasks: "none"; "selected" — the stage-1 SimCSE, the s = 0 control and the selected model (the
    # paper configs: a handful of models, not every trial); "all" — every trial too (a best-per-task row)
    transfer: Literal["none", "selected", "all"] = "none"
    # "pytorch": SimCSE's protocol (SentEval usepytorch: Adam logistic regression, early stopping), every fit of a
    # task trained at once; "sklearn": SentEval's scikit-learn logistic regression
    transfer_classifier: Literal["pytorch", "sklearn"] = "pytorch"

    def __post_init__(self):
        for t in self.tasks:
            _check(t in STS_TASKS or t in TRANSFER_TASKS, "eval.tasks",
                   f"unknown task {t!r}; choose from {', '.join(STS_TASKS + TRANSFER_TASKS)}")


# sweep.select_on's named sets, as reports name them
SELECT_ON = {"clean-dev": "clean dev", "stsb-dev": "STS-B dev", "sickr-dev": "SICK-R dev"}


def select_on_label(select_on: str) -> str:
    """How reports name the selection data: "clean dev", "STS-B dev", "SICK-R dev" or "dev file NAME"."""
    return SELECT_ON.get(select_on) or f"dev file {select_on.rsplit('/', 1)[-1]}"


@dataclass(frozen=True)
class SweepConfig:
    sparsities: tuple[float, ...] = PAPER_SPARSITIES
    lams: tuple[float, ...] = (0.25, 0.5, 0.75)
    seeds: tuple[int, ...] = (42,)
    # independent stage-1 SimCSE runs (train.seed + r: own seed, own data order), each scored; every trial and
    # control runs per replicate and comparisons are paired within a replicate and tested over replicates
    replicates: int = 1
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    max_concurrent_trials: int | None = None
    max_failures: int = 1
    scheduler: Literal["none", "asha"] = "none"  # asha: stop weak trials early, measured in training steps
    asha_grace_steps: int | None = None  # a trial runs at least this many steps (None: 2 × train.eval_steps)
    asha_reduction_factor: int = 3  # keep the best 1/rf of the trials at each rung
    export_best: bool = True
    export_onnx: bool = False  # the export also writes pruned/onnx/ (fp32 + int8, measured in its model card)
    allow_failed_trials: bool = False  # false: a sweep with failed trials exits 1 (after writing its report)
    # how masks are chosen, one grid dimension: the paper's score and the controls it must beat at equal budget
    scorers: tuple[Scorer, ...] = ("align_uniform",)
    select_lam: float | None = None  # select among this λ only (the paper's main table: 0.5); others still reported
    when_control_wins: Literal["export_control", "export_nothing"] = "export_control"  # s = 0 best on dev
    pilot: bool = False  # also prune the trained SimCSE at each sparsity without retraining (the paper's Figure 1)
    # "grid": every point of sparsities × lams (× scorers × seeds); "optuna": Ray Tune's OptunaSearch (TPE) samples
    # num_samples points of continuous sparsity in sparsity_range (and λ in lam_range, or from lams), seed
    # seeds[0]; the s = 0 control still runs per seed
    search: Literal["grid", "optuna"] = "grid"
    num_samples: int = 12
    sparsity_range: tuple[float, ...] = (0.01, 0.5)
    sparsity_scale: Literal["uniform", "log"] = "log"
    lam_range: tuple[float, ...] | None = None  # None: λ from sweep.lams (categorical)
    search_seed: int = 0
    # what selection optimises: "dev" — the best STS-B dev; "pareto" — dev vs encoder parameters: the report shows
    # the Pareto front and selection takes the smallest model within pareto_delta dev points of the best dev
    # (with sweep.search=optuna, TPE searches both objectives)
    objective: Literal["dev", "pareto"] = "dev"
    pareto_delta: float = 0.5
    # how the dev scores choose (objective "dev"): "safe" — a pruned point only where the choice data shows it
    # within `margin` points of the s = 0 control on every source of that data (an intersection-union test: each
    # source's one-sided bound, counting the pairs' noise by bootstrap and training noise from the control's
    # retrainings, sweep.control_seeds), the sparsest such point in a fixed sequence, else the control — and the
    # control when training noise cannot be estimated; "noninferior" — the same fixed sequence on the dev score
    # alone, tested over seeds (one seed: a bootstrap over the dev pairs); "superior" — a pruned point only if it
    # beats the control after Holm's correction; "best_dev" — the highest mean dev (the paper's rule; its configs
    # keep it)
    select: Literal["safe", "noninferior", "superior", "best_dev"] = "safe"
    margin: float = 0.5
    # extra retrainings of the s = 0 control, each with its own seed (after sweep.seeds): how far training noise
    # alone moves the dev score, which the "safe" rule must beat
    control_seeds: int = 2
    # the data dev evaluations read — checkpoints of stage 1 and of each trial, and the sweep's choice:
    # "clean-dev" (STS-B dev + SICK-R dev without any pair a reported test set holds; checkpoints and the choice
    # read disjoint halves of it), "stsb-dev" (SimCSE's; it shares 1,131 pairs with STS12–16 test; the paper's
    # configs keep it), "sickr-dev" (SICK's trial split), or a file of `sentence1<TAB>sentence2<TAB>score` lines
    # (relative to the data dir)
    select_on: str = "clean-dev"
    # experiment tracking: "tensorboard" (one stream per trial and stage 1, under tensorboard/), "mlflow" (Ray's
    # MLflowLoggerCallback; stage 1, every trial, the report, figures and export in one experiment), "wandb"
    # (Ray's WandbLoggerCallback; WANDB_MODE=offline honoured)
    loggers: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = ("tensorboard",)
    mlflow_tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else a sqlite store in the run (mlflow/)
    # the MLflow experiment / W&B group of the run (None: the run's last path segment + a hash of its whole URI)
    experiment: str | None = None
    wandb_project: str = "sparsecse"

    def __post_init__(self):
        _check(len(self.sparsities) > 0, "sweep.sparsities", "needs at least one value")
        for s in self.sparsities:
            _check(0 <= s < 1, "sweep.sparsities", f"{s} is outside [0, 1); sparsity is the fraction removed")
        _check(len(self.lams) > 0, "sweep.lams", "needs at least one value")
        for lam in self.lams:
            _check(0 <= lam <= 1, "sweep.lams", f"{lam} is outside [0, 1]")
        _check(len(self.seeds) > 0, "sweep.seeds", "needs at least one seed")
        _check(self.replicates >= 1, "sweep.replicates", f"{self.replicates} must be >= 1 (stage-1 runs)")
        _check(self.trial_cpus > 0, "sweep.trial_cpus", "must be > 0")
        _check(self.trial_gpus >= 0, "sweep.trial_gpus", "must be >= 0")
        _check(self.max_failures >= 0, "sweep.max_failures", "must be >= 0")
        _check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
               "sweep.max_concurrent_trials", "must be >= 1 or null")
        _check(self.asha_grace_steps is None or self.asha_grace_steps >= 1, "sweep.asha_grace_steps",
               "must be >= 1 or null")
        _check(self.asha_reduction_factor >= 2, "sweep.asha_reduction_factor", "must be >= 2")
        _check(len(self.scorers) > 0 and len(set(self.scorers)) == len(self.scorers), "sweep.scorers",
               "needs at least one scorer, each once")
        _check(self.select_lam is None or self.select_lam in self.lams, "sweep.select_lam",
               f"{self.select_lam} is not one of sweep.lams {list(self.lams)}")
        _check(self.num_samples >= 1, "sweep.num_samples", "must be >= 1")
        lo_hi = self.sparsity_range
        _check(len(lo_hi) == 2 and 0 < lo_hi[0] < lo_hi[1] < 1, "sweep.sparsity_range",
               f"{list(lo_hi)} must be [lo, hi] with 0 < lo < hi < 1 (e.g. [0.01, 0.5])")
        _check(self.lam_range is None or (len(self.lam_range) == 2 and 0 <= self.lam_range[0] < self.lam_range[1] <= 1),
               "sweep.lam_range", "must be [lo, hi] with 0 <= lo < hi <= 1, or null")
        _check(self.pareto_delta >= 0 and math.isfinite(self.pareto_delta), "sweep.pareto_delta",
               f"{self.pareto_delta} must be >= 0 (STS-B dev Spearman × 100 points below the best dev)")
        _check(self.select_on in SELECT_ON or self.select_on.endswith((".tsv", ".txt", ".csv")), "sweep.select_on",
               f"{self.select_on!r}: choose clean-dev, stsb-dev, sickr-dev or a .tsv/.txt/.csv file of "
               "s1<TAB>s2<TAB>score lines")
        _check(0 <= self.control_seeds <= 20, "sweep.control_seeds", f"{self.control_seeds} must be in 0..20")
        _check(self.margin >= 0 and math.isfinite(self.margin), "sweep.margin",
               f"{self.margin} must be >= 0 (STS-B dev Spearman × 100 points below the s = 0 control)")
        _check(len(set(self.loggers)) == len(self.loggers), "sweep.loggers", "lists each logger once")
        if self.search == "optuna":
            _check(self.scorers == ("align_uniform",), "sweep.scorers", "the controls run at grid sparsities; with "
                   "sweep.search=optuna keep [align_uniform] and run the controls as a grid sweep")
            _check(self.replicates == 1, "sweep.replicates", "replicates run as a grid; with sweep.search=optuna "
                   "keep 1")
            _check(self.lam_range is None or self.select_lam is None, "sweep.select_lam",
                   "fixes λ among sweep.lams; with a continuous sweep.lam_range set it to null")


@dataclass(frozen=True)
class RayConfig:
    num_workers: int = 1  # Ray Train data-parallel workers for stage 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1  # Ray Train FailureConfig for stage 1
    num_cpus: int | None = None  # local Ray only: CPUs to give the embedded cluster
    # how long the driver waits for the Ray cluster (--address / RAY_ADDRESS) and for the run's storage (--out) to
    # answer before it gives up with one line naming what did not answer
    connect_timeout_s: float = 60.0
    # one driver per run: a driver's lock in the run's storage counts as abandoned once its heartbeat is this old
    # (a --resume then takes it over); a second driver on a live run is refused (runlock.py)
    lock_stale_s: float = 120.0
    # on a cluster: how long the driver waits for the CPUs/GPUs the config needs to join (an autoscaler starting
    # workers) before it refuses in one line; 0 refuses at once
    wait_for_resources_s: float = 0.0
    # local Ray only: the port of its Prometheus metrics endpoint (Ray's metrics and the sweep's sparsecse_*; None:
    # Ray picks one). On a cluster each node's `ray start --metrics-export-port` sets it
    metrics_export_port: int | None = None

    def __post_init__(self):
        _check(self.num_workers >= 1, "ray.num_workers", "must be >= 1")
        _check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus", "must be >= 1 or null")
        _check(0 < self.connect_timeout_s <= 3600, "ray.connect_timeout_s", "must be in (0, 3600] seconds")
        _check(self.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0")
        _check(4 <= self.lock_stale_s <= 86400, "ray.lock_stale_s", "must be in [4, 86400] seconds")
        _check(0 <= self.wait_for_resources_s <= 86400, "ray.wait_for_resources_s", "must be in [0, 86400] seconds")
        _check(self.metrics_export_port is None or 1024 <= self.metrics_export_port <= 65535,
               "ray.metrics_export_port", "must be a port in [1024, 65535] or null")
        _check(self.max_failures >= 0, "ray.max_failures", "must be >= 0")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        def conv(v):
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            return v
        return {f.name: {k: conv(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                for f in fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        _check(value in get_args(tp), key, f"{value!r} is not one of {', '.join(map(str, get_args(tp)))}")
        return value
    if origin in (tuple,):
        inner = get_args(tp)[0]
        if isinstance(value, (int, float, str)):
            value = [value]
        _check(isinstance(value, (list, tuple)), key, "must be a list")
        return tuple(_coerce(v, inner, key) for v in value)
    args = get_args(tp)
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false (got {value!r})")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"must be a number (got {value!r})")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string (got {value!r})")
        return value
    return value


LEGACY_VALUES = {("eval", "transfer"): {True: "all", False: "none"}}  # eval.transfer was true/false before its modes


def _section_from_dict(cls, data: dict, section: str):
    data = {k: LEGACY_VALUES.get((section, k), {}).get(v, v) if isinstance(v, bool) else v for k, v in data.items()} \
        if isinstance(data, dict) else data
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    _check(isinstance(data, dict), section, "must be a mapping")
    for k in data:
        _check(k in names, f"{section}.{k}", f"unknown key; valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> Config:
    data = data or {}
    _check(isinstance(data, dict), "<root>", "the YAML must be a mapping of sections")
    hints = get_type_hints(Config)
    names = [f.name for f in fields(Config)]
    for k in data:
        _check(k in names, k, f"unknown section; valid sections: {', '.join(names)}")
    return Config(**{k: _section_from_dict(hints[k], v or {}, k) for k, v in data.items()})


def _sections(data: dict, where: str) -> dict:
    """The raw config's sections as mappings (a missing or empty section is {}); `where` names the source."""
    out = {}
    for k, v in (data or {}).items():
        if v is not None and not isinstance(v, dict):
            raise SparseCSEError(f"{where}: config {k}: must be a mapping of keys (got {v!r}); e.g. {k}: {{...}}")
        out[k] = dict(v or {})
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (value parsed as YAML) to a raw config dict."""
    data = _sections(data, "config")
    for ov in overrides or []:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise SparseCSEError(f"--set {ov!r}: expected section.key=value, e.g. --set train.lr=3e-5")
        key, raw = ov.split("=", 1)
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            why = " ".join(str(getattr(e, "problem", None) or e).split())  # one line, whatever YAML says
            raise SparseCSEError(f"--set {ov!r}: the value is not valid YAML ({why}); "
                                 "quote it, e.g. --set 'model.name=\"a:b\"'") from None
        data.setdefault(section, {})[name] = value
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """The config of a YAML file (or the defaults) with `--set` overrides; an error names the file for what the
    file says and `--set` for what an override says."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SparseCSEError(f"{p}: config file not found; pass a YAML such as sweeps/quickstart.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise SparseCSEError(f"{p}:{where} invalid YAML ({getattr(e, 'problem', None) or e}); fix the syntax") from None
        if not isinstance(data, dict):
            raise SparseCSEError(f"{p}: the YAML must be a mapping of sections (model, data, train, ...)")
        data = _sections(data, str(p))
        try:
            config_from_dict(data)
        except SparseCSEError as e:
            raise SparseCSEError(f"{p}: {e}") from None
    merged = apply_overrides(data, overrides or [])
    try:
        return config_from_dict(merged)
    except SparseCSEError as e:
        raise SparseCSEError(f"--set {' '.join(overrides or [])}: {e}" if overrides else f"{path}: {e}") from None
