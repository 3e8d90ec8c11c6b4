"""What a trial is and what it returns: the one shape every module reads and writes.

    Point        one grid point of the sweep: (sparsity, λ, seed, scorer, combine, normalize); its trial name, its
                 seed-pooled key, the method that chose its mask, its Tune parameters
    TrialResult  a trial's point, last reported metrics, error and checkpoint (relative to the run)
    grid_points  the config's grid as Points (× stage-1 replicates)

Records written by earlier versions of sparsecse are read in one place only, `upgrade_record`: a trial's
parameters (nested under "point", no scorer, no reading), a pilot row (no method), a scores file's scoring note (no
positive-pair count). Older *configs* are read where the config is (config.LEGACY_VALUES, rundir.upgrade_state) and
older checkpoint layouts where checkpoints are (checkpoints.best_model): both need more than a record's fields.
Nothing here imports more than the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import STS_TASKS, Config

PAPER_SCORER = "align_uniform"  # the paper's score; every other scorer is a control (config.CONTROL_SCORERS)
DEFAULT_READING = ("gradient", "none")  # (score.combine, score.normalize) of the paper's formula

# metric names a trial reports (Tune's metric, the report's columns)
DEV = "best_stsb_dev"  # what Tune, its schedulers and selection optimise: STS-B dev Spearman × 100
PARAMS = "encoder_params"  # the second objective of sweep.objective=pareto, in every trial report
EVALUATED = "evaluated"  # True on a trial's final report (its test evaluation)
LAST_DEV = "stsb_dev"  # STS-B dev Spearman × 100 at the latest evaluation (DEV is the best so far)
TEST, TRANSFER, CHOICE = "test/", "transfer/", "choice/"  # test/<STS task>, transfer/<task>, choice/<source>


def metric_key(kind: str, task: str) -> str:
    """The one spelling of a per-task metric: metric_key("test", "avg") is the STS test average's key,
    metric_key("transfer", "MR") MR's accuracy, metric_key("choice", "all") the Spearman × 100 of a trial's best
    model on the pairs the sweep chooses on (with sweep.select_on: clean-dev; "stsb-dev", "sickr-dev": each
    source of them). No other module spells these keys."""
    prefix = {"test": TEST, "transfer": TRANSFER, "choice": CHOICE}.get(kind)
    if prefix is None:
        raise ValueError(f"metric kind {kind!r}: test, transfer or choice")
    return f"{prefix}{task}"


def reading_parts(scorer: str, combine: str = "gradient", normalize: str = "none") -> list[str]:
    """The reading of the scores where it is not the default (["normalize=layer"]); combine is about the paper's two
    objectives, so it never describes a control scorer."""
    return ([f"combine={combine}"] if scorer == PAPER_SCORER and combine != "gradient" else []) + (
        [f"normalize={normalize}"] if normalize != "none" else [])


def reading_label(scorer: str, combine: str = "gradient", normalize: str = "none") -> str:
    """The reading as the report writes it beside a method ("(normalize=layer)"), else ""."""
    parts = reading_parts(scorer, combine, normalize)
    return f"({', '.join(parts)})" if parts else ""


def method_name(scorer: str, combine: str = "gradient", normalize: str = "none") -> str:
    """How a mask was chosen, as the report names it: the scorer, and the reading when it is not the default."""
    label = reading_label(scorer, combine, normalize)
    return f"{scorer} {label}" if label else scorer


def reading_order(reading: tuple[str, str]) -> tuple:
    """Sort key of a (combine, normalize) reading: the default first."""
    return (reading[0] != "gradient", reading[1] != "none", reading)


def _num(x: float, digits: int) -> str:
    """A grid value with `digits` decimals; a sampled one (sweep.search=optuna) with six, so no two collide."""
    return f"{x:.{digits}f}" if round(x, digits) == x else f"{x:.6f}"


@dataclass(frozen=True)
class Point:
    """One grid point: mask the lowest-scoring fraction `sparsity` of heads and of neurons, ranked by `scorer`
    (the paper's L_score at λ = `lam`, or a control), read under (`combine`, `normalize`); retrain with `seed`.
    sparsity 0 is the rewound SimCSE control: nothing masked, so scorer, λ and reading do not matter."""

    sparsity: float
    lam: float
    seed: int
    scorer: str = PAPER_SCORER
    combine: str = DEFAULT_READING[0]
    normalize: str = DEFAULT_READING[1]
    replicate: int = 0  # which stage-1 run's scores chose the mask (sweep.replicates)

    KEYS = ("sparsity", "lam", "seed", "scorer", "combine", "normalize", "replicate")  # Tune's parameters, in order

    @property
    def is_control(self) -> bool:
        """The s = 0 control (unpruned, rewound and retrained like every trial)."""
        return self.sparsity == 0

    @property
    def is_paper(self) -> bool:
        """Chosen by the paper's score (the s = 0 control counts as its s = 0 point)."""
        return self.scorer == PAPER_SCORER

    @property
    def run_seed(self) -> int:
        """The seed a trial retrains (and a random mask draws) with: `seed`, offset by 1000 per stage-1 replicate,
        so replicates share no randomness."""
        return self.seed + 1000 * self.replicate

    @property
    def reading(self) -> tuple[str, str]:
        return self.combine, self.normalize

    @property
    def method(self) -> str:
        return method_name(self.scorer, self.combine, self.normalize)

    @property
    def name(self) -> str:
        """s0.100_l0.50_seed1 for the paper's score; s0.100_random_seed1 for a control scorer (λ-free); a reading
        other than the default adds _combine-score / _norm-layer (s0.100_l0.50_norm-layer_seed1), a stage-1
        replicate other than the first _rep<r> (s0.100_l0.50_seed1_rep2). Trial names,
        prediction files and TensorBoard runs use it."""
        mid = f"l{_num(self.lam, 2)}" if self.is_paper or self.is_control else self.scorer
        if not self.is_control:
            mid += "_combine-score" if self.is_paper and self.combine == "score" else ""
            mid += "_norm-layer" if self.normalize == "layer" else ""
        rep = f"_rep{self.replicate}" if self.replicate else ""
        return f"s{_num(self.sparsity, 3)}_{mid}_seed{self.seed}{rep}"

    @property
    def key(self) -> tuple:
        """The grid point with seeds and replicates pooled: (scorer, sparsity, λ, combine, normalize); the s = 0
        control is one key whatever its λ (nothing is masked)."""
        if self.is_control:
            return (PAPER_SCORER, 0.0, 0.0, "", "")
        return (self.scorer, self.sparsity, self.lam, self.combine, self.normalize)

    def params(self) -> dict:
        """The point as Tune parameters (each its own column in Tune's table)."""
        return {k: getattr(self, k) for k in self.KEYS}

    @classmethod
    def from_params(cls, params: dict, reading: tuple[str, str] = DEFAULT_READING) -> "Point":
        """A point from Tune parameters or a results record — also as earlier versions wrote them: parameters nested
        under "point"; no scorer (the paper's score was the only one); no reading (`reading`, the config's first
        one, was the only one run)."""
        p = upgrade_record("point", params, reading=reading)
        return cls(sparsity=float(p["sparsity"]), lam=float(p["lam"]), seed=int(p["seed"]), scorer=p["scorer"],
                   combine=p["combine"], normalize=p["normalize"], replicate=int(p["replicate"]))


def upgrade_record(kind: str, rec: dict, reading: tuple[str, str] = DEFAULT_READING) -> dict:
    """`rec` in today's shape, whichever sparsecse version wrote it — the one reader of older records:
        point     Tune parameters or a results row: once nested under "point"; no scorer (the paper's score was the
                  only one); no reading (`reading`, the config's first, was the only one run); no replicate (0)
        pilot_row a pilot.json row: no "method" (before the readings were a dimension its scorer was its method)
        scoring   a scores file's scoring note: no "positive_pairs" (the count was not recorded: None)"""
    if kind == "point":
        p = rec.get("point") or rec
        return {**p, "scorer": p.get("scorer") or PAPER_SCORER, "combine": p.get("combine") or reading[0],
                "normalize": p.get("normalize") or reading[1], "replicate": p.get("replicate") or 0}
    if kind == "pilot_row":
        return {**rec, "method": rec.get("method", rec["scorer"])}
    if kind == "scoring":
        return {"positive_pairs": None, **rec}
    raise ValueError(f"upgrade_record: unknown record kind {kind!r}")


@dataclass(frozen=True)
class TrialResult:
    """One trial as the sweep got it back: its point, its last reported metrics, its error (one line, or None) and
    its last checkpoint relative to the run (the best dev model is `<checkpoint>/best`)."""

    point: Point
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    checkpoint: str | None = None

    @property
    def evaluated(self) -> bool:
        """The last report is the trial's final test evaluation. (Tune sets its own "done" on the last result of a
        trial it stops early; sweeps before "evaluated" existed reported "done" only there.)"""
        return bool(self.metrics.get(EVALUATED, self.metrics.get("done")))

    @property
    def finished(self) -> bool:
        """Trained, evaluated on test, with a finite dev score: a trial selection and statistics may use."""
        return not self.error and self.evaluated and math.isfinite(self.metrics.get(DEV, float("nan")))

    @property
    def status(self) -> str:
        return "error" if self.error else ("done" if self.evaluated else "incomplete")

    @property
    def dev(self) -> float:
        return self.metrics[DEV]

    @property
    def choice(self) -> float:
        """What the sweep chooses on: the best model's score on the choice pairs, held out from its checkpoint
        selection (sweep.select_on: clean-dev); else — the paper's protocol, and runs before it — its best dev."""
        return self.metrics.get(f"{CHOICE}all", self.metrics[DEV])

    @property
    def params(self) -> int | None:
        p = self.metrics.get(PARAMS)  # trials of sweeps before it was reported lack it
        return None if p is None else int(p)

    def test(self, task: str, default=None):
        """STS test Spearman × 100 of `task` ("avg" for the average), or `default` when not reported."""
        return self.metrics.get(f"{TEST}{task}", default)

    def test_tasks(self) -> list[str]:
        """The STS test tasks this trial reported, in the papers' order, "avg" last."""
        keys = {k[len(TEST):] for k in self.metrics if k.startswith(TEST)}
        return [t for t in STS_TASKS if t in keys] + (["avg"] if "avg" in keys else [])

    def choice_scores(self) -> dict[str, float]:
        """{source or "all": Spearman × 100 on the choice pairs} this trial reported ({} without them)."""
        return {k[len(CHOICE):]: v for k, v in self.metrics.items() if k.startswith(CHOICE)}

    def transfer(self) -> dict[str, float]:
        """{transfer task: accuracy} this trial reported (F1 scores left out)."""
        return {k[len(TRANSFER):]: v for k, v in self.metrics.items()
                if k.startswith(TRANSFER) and not k.endswith("_f1")}

    @classmethod
    def from_record(cls, rec: dict, reading: tuple[str, str] = DEFAULT_READING) -> "TrialResult":
        """From {"config": params, "metrics", "error", "checkpoint"} (the driver's record of a Tune result)."""
        return cls(Point.from_params(rec["config"], reading), dict(rec.get("metrics") or {}), rec.get("error"),
                   rec.get("checkpoint"))


def grid_points(cfg: Config) -> list[Point]:
    """seed × sparsity × scorer × reading (score.combine × score.normalize) × λ. Sparsity 0 (the rewound SimCSE
    control) masks nothing, so it runs once per seed; the control scorers ignore λ and combine, so they run once
    per (normalize, sparsity, seed)."""
    pts = []
    first = (cfg.score.combine[0], cfg.score.normalize[0])
    for rep in range(cfg.sweep.replicates):
        for seed in cfg.sweep.seeds:
            for s in cfg.sweep.sparsities:
                for scorer in ((PAPER_SCORER,) if s == 0 else cfg.sweep.scorers):
                    lams = cfg.sweep.lams if (s > 0 and scorer == PAPER_SCORER) else cfg.sweep.lams[:1]
                    for combine, normalize in (cfg.score.allocations(scorer) if s > 0 else [first]):
                        pts += [Point(float(s), float(lam), int(seed), scorer, combine, normalize, rep)
                                for lam in lams]
        if 0 in cfg.sweep.sparsities:  # the control's extra retrainings (sweep.control_seeds): training noise
            top = max(cfg.sweep.seeds)
            pts += [Point(0.0, float(cfg.sweep.lams[0]), top + k, PAPER_SCORER, *first, rep)
                    for k in range(1, cfg.sweep.control_seeds + 1)]
    return pts


def replicate_name(base: str, replicate: int) -> str:
    """Where a stage-1 replicate's artifacts live: the first under the usual names (simcse, stage1,
    scores.parquet), the r-th (r ≥ 1) beside them with -rep<r> (simcse-rep1, stage1-rep1, scores-rep1.parquet)."""
    if not replicate:
        return base
    stem, dot, ext = base.partition(".")
    return f"{stem}-rep{replicate}{dot}{ext}"


def sts_tasks(tasks) -> tuple[str, ...]:
    """The STS tasks among `tasks` (eval.tasks may also name transfer tasks), in their given order."""
    return tuple(t for t in tasks if t in STS_TASKS)
