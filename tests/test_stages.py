"""The trial as a plain function: `stages.trial` runs without Ray, reporting to a list — what Ray Tune gets from it
(every evaluation with its checkpoint, then the test figures) and how it resumes from a checkpoint it reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sparsecse.core.results import DEV, PARAMS, Point, TrialResult
from sparsecse.core.storage import Storage


@pytest.fixture(scope="module")
def trial_setup(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """A run directory holding the scores every trial shares, and the config a sweep would pass its trials."""
    from sparsecse.core.config import load_config
    from sparsecse.method.data import load_stsb
    from sparsecse.method.model import load_encoder
    from sparsecse.method.score import compute_scores

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "data.max_train_sentences=64", "train.batch_size=8",
                             "train.max_len=16", "train.max_steps=4", "train.eval_steps=2", "train.eval_max_pairs=40",
                             "eval.tasks=[STSBenchmark, SICKRelatedness]", "sweep.loggers=[]"])
    enc = load_encoder(str(tiny_model_dir), pooler="cls_before_pooler")
    scores = compute_scores(enc, load_stsb(tiny_data_dir, "train"), batch_size=8, max_pairs=24)
    return tmp_path_factory.mktemp("run"), cfg, scores


def _run(point: Point, run: Path, cfg, scores, data: Path, restored=lambda local: None,
         die_at: int | None = None) -> list[tuple[dict, set]]:
    """The trial's reports, each as (metrics, the files of its checkpoint — copied before the trial deletes it).
    `die_at`: the trial's node dies while reporting that step's checkpoint (Tune never receives it)."""
    from sparsecse.run import stages

    got = []

    def report(metrics: dict, ckpt: Path | None) -> None:
        if ckpt is not None and metrics["step"] == die_at:
            raise Died(die_at)
        got.append((metrics, None if ckpt is None else {str(p.relative_to(ckpt)) for p in ckpt.rglob("*")}))
        if ckpt is not None:  # kept as a trial's storage would keep it
            shutil.rmtree(run / f"ckpt-{metrics['step']}", ignore_errors=True)
            shutil.copytree(ckpt, run / f"ckpt-{metrics['step']}")

    stages.trial(point, store_uri=str(run), data_dir=str(data), cfg_dict=cfg.to_dict(), scores=scores,
                 report=report, restored=restored)
    return got


class Died(Exception):
    pass


def _with(cfg, **train):
    return cfg.replace(train=type(cfg.train)(**{**cfg.to_dict()["train"], **train}))


def test_a_trial_reports_each_evaluation_with_its_checkpoint_then_its_test_figures(trial_setup, tiny_data_dir):
    from sparsecse.core.checkpoints import best_model

    run, cfg, scores = trial_setup
    point = Point(0.5, 0.5, 1)
    got = _run(point, run, _with(cfg, checkpoint_every=1), scores, tiny_data_dir)
    *training, (final, final_ckpt) = got
    # evaluations at steps 2 and 4, each with a checkpoint (checkpoint_every=1) pointing at the best dev model,
    # which lives beside it in the run's storage, not inside it; the last marked last
    assert [m["step"] for m, _ in training] == [2, 4] and [m["last"] for m, _ in training] == [False, True]
    assert all(c and "best.json" in c and not any(f.startswith("best/") for f in c) for _, c in training)
    best = run / best_model(Storage(str(run)), "ckpt-4")
    assert (best / "model.safetensors").is_file() and best.is_relative_to(run / "models" / "trials" / point.name)
    # every report names its point (Tune's columns) and the pruned encoder's size (Pareto's second objective)
    for m, _ in got:
        assert Point.from_params(m) == point and m["trial"] == point.name and m[PARAMS] > 0
    assert not any(m["evaluated"] for m, _ in training)
    # the final report: no new checkpoint (the last training report holds it), test figures and dev
    assert final_ckpt is None and final["evaluated"] and final["step"] == 4
    assert set(final) >= {"test/STSBenchmark", "test/SICKRelatedness", "test/avg", "align", "uniform", DEV}
    assert final[DEV] == max(m["stsb_dev"] for m, _ in training)
    assert final["checkpoints"] == 2 and final["checkpoint_bytes"] > 0 and final["checkpoint_s"] >= 0
    result = TrialResult(point, final, None, "ckpt-4")
    assert result.finished and result.test_tasks() == ["STSBenchmark", "SICKRelatedness", "avg"]
    # the per-pair predictions the report's bootstrap resamples are in the run's storage
    assert (run / "predictions" / f"{point.name}.parquet").is_file()
    # half the heads and neurons masked: fewer parameters than the dense control reports
    dense = _run(Point(0.0, 0.5, 1), run, cfg, scores, tiny_data_dir)
    assert final[PARAMS] < dense[-1][0][PARAMS]


def test_a_restored_trial_continues_from_its_checkpoint_instead_of_rewinding(trial_setup, tiny_data_dir):
    """Tune restarts a trial from the last checkpoint it reported (`restored`): it trains on from that step, with
    the best model its checkpoint points at."""
    run, cfg, scores = trial_setup
    cfg = _with(cfg, checkpoint_every=1)
    point = Point(0.5, 0.25, 2)
    with pytest.raises(Died):  # the node dies while reporting the step-4 checkpoint: step 2's is the last kept
        _run(point, run, cfg, scores, tiny_data_dir, die_at=4)
    asked = []

    def restored(local: Path) -> Path:
        asked.append(local)
        return Path(shutil.copytree(run / "ckpt-2", local))

    again = _run(point, run, cfg, scores, tiny_data_dir, restored=restored)
    assert len(asked) == 1
    # only the evaluation after the checkpoint is redone; the run ends where an uninterrupted one does
    assert [m["step"] for m, c in again if c is not None] == [4]
    assert again[-1][0]["evaluated"] and again[-1][0]["step"] == 4
    # the restored best model was the dev best up to step 2: the final dev is at least that
    assert again[-1][0][DEV] >= again[0][0]["best_stsb_dev"] - 1e-9
    # one best model of the trial's run left in storage: the one its final checkpoint points at
    kept = list((run / "models" / "trials" / point.name).glob("*/best-*"))
    assert len(kept) == 1


def test_checkpoint_uploads_do_not_grow_with_the_evaluations(trial_setup, tiny_data_dir, monkeypatch):
    """The policy's bound: however often a trial evaluates, it uploads its best model once per checkpoint that
    follows an improvement — with the default policy (minutes) a short trial uploads its final best model only:
    weights ≤ 3× the model, optimizer state ≤ 2× — and a best model is never uploaded twice."""
    from sparsecse.core.storage import Storage as S

    run, cfg, scores = trial_setup
    uploads = []
    real = S.upload_dir
    monkeypatch.setattr(S, "upload_dir", lambda self, local, rel, replace=True: (
        uploads.append(rel), real(self, local, rel, replace))[1])
    weights = (Path(cfg.model.name) / "model.safetensors").stat().st_size
    finals = {}
    for evals in (1, 2, 4):  # eval every 4, 2, 1 steps
        uploads.clear()
        got = _run(Point(0.3, 0.5, 3), run, _with(cfg, eval_steps=4 // evals), scores, tiny_data_dir)
        final = got[-1][0]
        assert sum(1 for _, c in got if c is not None) == 1 == final["checkpoints"]  # the final one only
        assert len([m for m, _ in got if not m["evaluated"]]) == evals
        assert final["checkpoint_weights_bytes"] <= 3 * weights and final["checkpoint_optimizer_bytes"] <= 2 * weights
        finals[evals] = final["checkpoint_weights_bytes"]
        assert [r for r in uploads if r.startswith("models/")] and len(set(uploads)) == len(uploads)
    # the same bytes whether it evaluated once or four times (the best model's metadata may differ by a digit:
    # its step and dev score are those of whichever evaluation was best)
    assert max(finals.values()) - min(finals.values()) <= 16, finals
    # every evaluation a resumable checkpoint (the most the policy allows): still each best model uploaded once,
    # and a checkpoint whose best did not change carries only its pointer
    uploads.clear()
    got = _run(Point(0.3, 0.5, 3), run, _with(cfg, eval_steps=1, checkpoint_every=1), scores, tiny_data_dir)
    bests = [r for r in uploads if r.startswith("models/")]
    improved = {m["step"] for m, _ in got if not m["evaluated"] and m["stsb_dev"] == m["best_stsb_dev"]}
    assert len(bests) == len(set(bests)) == len(improved) and got[-1][0]["checkpoints"] == 4


def test_checkpoint_policy_by_evaluations_and_by_minutes():
    from sparsecse import SparseCSEError
    from sparsecse.core.checkpoints import CheckpointPolicy, parse_every

    every3 = CheckpointPolicy(3)
    assert [every3.due(final=False) for _ in range(7)] == [False, False, True] * 2 + [False]
    now = [0.0]
    p = CheckpointPolicy("10m", clock=lambda: now[0])
    due = []
    for t in (60, 540, 601, 700, 1199, 1300):
        now[0] = t
        due.append(p.due(final=False))
    assert due == [False, False, True, False, False, True]
    assert p.due(final=True)  # the last evaluation always checkpoints
    assert parse_every("2.5 min") == ("minutes", 2.5) and parse_every(4) == ("evaluations", 4)
    for bad in (0, -1, "soon", "0m", True, 1.5):
        with pytest.raises(SparseCSEError, match="train.checkpoint_every"):
            parse_every(bad)


@pytest.mark.parametrize("mode", ["none", "selected", "all"])
def test_transfer_runs_on_the_stage1_model_the_control_and_the_selection_only_when_asked(mode, tmp_path, monkeypatch):
    """eval.transfer: none | selected | all — the driver's evaluation stage asks for the seven tasks on the stage-1
    SimCSE, the s = 0 control and the selected model (never on every trial: that is the trials' own job under
    `all`), and the report's transfer table has one row each."""
    from sparsecse.run import ray_adapter as ra
    from sparsecse.run import outcome, rundir
    from sparsecse.core.config import load_config
    from sparsecse.study.select import select
    from sparsecse.core.storage import Storage

    cfg = load_config(None, [f"eval.transfer={mode}", "sweep.export_best=false"])
    results = [TrialResult(Point(s, 0.5, k), {"evaluated": True, DEV: 80.0 + 10 * s + k, "test/avg": 70.0},
                           None, f"tune/t{s}_{k}/checkpoint_000001") for s in (0.0, 0.3) for k in (1, 2)]
    selected = select(results)
    asked = []

    def run_tasks(calls):
        asked.extend((what, args[1], kw) for what, _, args, kw, *_ in calls)
        return [{"sts": {"avg": 1.0}, "transfer": {"MR": 80.0, "avg": 80.0}} for _ in calls]

    monkeypatch.setattr(ra, "run_tasks", run_tasks)
    run = rundir.Run(cfg, Storage(tmp_path / "run"), str(tmp_path), rundir.SweepState(config=cfg.to_dict()), False, None)
    out = outcome.evaluate_and_export_stage(run, results, selected)
    with_transfer = {rel for _, rel, kw in asked if kw.get("transfer")}
    if mode == "none":
        assert with_transfer == set() and out["transfer"] is None
    else:
        assert with_transfer == {"simcse/best", "tune/t0.3_2/checkpoint_000001/best", "tune/t0.0_2/checkpoint_000001/best"}
        assert list(out["transfer"]) == ["SimCSE", "SimCSE control s=0 (rewound + retrained)", "SparseCSE"]
    assert load_config(None, [f"eval.transfer={str(mode != 'none').lower()}"]).eval.transfer == (
        "none" if mode == "none" else "all")  # true/false of older configs


class _NoTracking:
    def logger_settings(self):
        return {}

    def sync(self):
        pass


def _resumed_run(cfg, tmp_path, monkeypatch, run_tuner):
    """A resumed sweep's Run whose Tune is `run_tuner` (no Ray, no tracker, no SimCSE scores)."""
    from sparsecse.run import ray_adapter as ra
    from sparsecse.run import stages
    from sparsecse.run import rundir

    monkeypatch.setattr(ra, "run_tuner", run_tuner)
    monkeypatch.setattr(stages, "load_simcse_scores", lambda store, cfg, replicate=0: None)
    return rundir.Run(cfg, Storage(tmp_path / "run"), str(tmp_path), rundir.SweepState(config=cfg.to_dict()), True,
                     _NoTracking())


def test_a_resume_runs_the_grid_points_a_restored_experiment_lost_and_never_drops_one(tmp_path, monkeypatch):
    """Tune restores an experiment whose trial list lacks a point its searcher had already handed out: the resumed
    sweep runs exactly the lost points in tune-missing/; a point that still has no trial is an error naming it."""
    from sparsecse import TrialsFailed
    from sparsecse.run import sweep
    from sparsecse.core.config import load_config
    from sparsecse.core.results import grid_points

    cfg = load_config(None, ["sweep.sparsities=[0, 0.1, 0.3]", "sweep.lams=[0.5]", "sweep.seeds=[1]",
                             "sweep.control_seeds=0"])
    grid = grid_points(cfg)
    calls = []

    def run_tuner(trial, params, points, run, *, name, asha=None, search=None, restart_errored=False):
        calls.append((name, list(points)))
        kept = points if name != "tune" else [p for p in points if p.sparsity != 0.3]  # the lost point
        return [TrialResult(p, {"evaluated": True, DEV: 80.0}, None, f"{name}/{p.name}") for p in kept]

    results = sweep.trials_stage(_resumed_run(cfg, tmp_path, monkeypatch, run_tuner), scores=None)
    assert [n for n, _ in calls] == ["tune", "tune-missing"] and calls[1][1] == [p for p in grid if p.sparsity == 0.3]
    assert sorted(r.point.sparsity for r in results) == [0.0, 0.1, 0.3]
    # a point with no trial after all that: exit 1, named
    with pytest.raises(TrialsFailed, match=r"1 grid point\(s\) came back from Tune with no trial: s0.300_l0.50_seed1"):
        sweep.account_for_points(cfg, [r for r in results if r.point.sparsity != 0.3])
    sweep.account_for_points(cfg, results)  # all there: no error


def test_a_resume_keeps_one_result_for_a_grid_point_a_restored_experiment_ran_twice(tmp_path, monkeypatch, capsys):
    """The converse of a lost point: a driver killed after Tune saved its trial list but before the searcher's
    position makes the restored searcher hand out a point again (seen in the interrupted-run test: s0.300 twice in
    results.json). The sweep keeps one result per point — the finished one — and says so once."""
    from sparsecse.run import sweep
    from sparsecse.core.config import load_config

    cfg = load_config(None, ["sweep.sparsities=[0, 0.1, 0.3]", "sweep.lams=[0.5]", "sweep.seeds=[1]",
                             "sweep.control_seeds=0"])

    def run_tuner(trial, params, points, run, *, name, asha=None, search=None, restart_errored=False):
        again = [p for p in points if p.sparsity == 0.3]
        return ([TrialResult(p, {"evaluated": False, DEV: 70.0}, None, f"{name}/a-{p.name}") for p in again]
                + [TrialResult(p, {"evaluated": True, DEV: 80.0}, None, f"{name}/{p.name}") for p in points])

    results = sweep.trials_stage(_resumed_run(cfg, tmp_path, monkeypatch, run_tuner), scores=None)
    assert sorted(r.point.sparsity for r in results) == [0.0, 0.1, 0.3]
    assert all(r.finished for r in results)  # the finished run of s0.300 is the one kept
    assert "ran 1 grid point(s) twice (s0.300_l0.50_seed1); one result is kept for each" in capsys.readouterr().out
    sweep.account_for_points(cfg, results)


def test_a_trial_restored_from_a_checkpoint_storage_no_longer_has_runs_again_from_scratch(tmp_path, monkeypatch, capsys):
    """A driver killed between Tune deleting a trial's older checkpoint (num_to_keep=1) and uploading the experiment
    state naming the newer one: the resumed trial fails to restore (Tune's "does not exist on storage anymore"). The
    sweep then restores the experiment once more with its errored trials restarted from scratch: no trial is lost."""
    from sparsecse.run import sweep
    from sparsecse.core.config import load_config

    cfg = load_config(None, ["sweep.sparsities=[0, 0.1]", "sweep.lams=[0.5]", "sweep.seeds=[1]",
                             "sweep.control_seeds=0"])
    calls = []
    gone = ("ValueError: Could not recover from checkpoint as it does not exist on storage anymore. Got storage fs "
            "type `s3` and path: bucket/run/tune/trial_x/checkpoint_000002")

    def run_tuner(trial, params, points, run, *, name, asha=None, search=None, restart_errored=False):
        calls.append((name, restart_errored))
        lost = not restart_errored
        return [TrialResult(p, {"evaluated": not (lost and p.sparsity), DEV: 80.0},
                            gone if lost and p.sparsity else None, f"{name}/{p.name}") for p in points]

    results = sweep.trials_stage(_resumed_run(cfg, tmp_path, monkeypatch, run_tuner), scores=None)
    assert calls == [("tune", False), ("tune", True)]
    assert all(r.error is None and r.finished for r in results) and len(results) == 2
    assert "1 trial(s) restored from a checkpoint no longer in storage (s0.100_l0.50_seed1)" in capsys.readouterr().out


def test_the_starting_model_is_also_scored_with_its_own_pooling_and_reported_first(tmp_path, monkeypatch,
                                                                                   tiny_model_dir):
    """A sentence-transformers base (all-MiniLM-L6-v2 pools by mean) is what its users run: the report's first
    row scores it that way, beside the CLS reading every trial is evaluated with."""
    import shutil

    from sparsecse.core.config import load_config
    from sparsecse.core.storage import Storage
    from sparsecse.run import outcome, rundir
    from sparsecse.run import ray_adapter as ra
    from sparsecse.study.report import ReportInputs, _test_results

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    cfg = load_config(None, [f"model.name={base}", "sweep.export_best=false"])
    asked = []
    monkeypatch.setattr(ra, "run_tasks", lambda calls: asked.extend(calls) or [
        {"sts": {"avg": 60.0 + i}} for i in range(len(calls))])
    run = rundir.Run(cfg, Storage(tmp_path / "run"), str(tmp_path), rundir.SweepState(config=cfg.to_dict()), False,
                     None)
    out = outcome.evaluate_and_export_stage(run, [], None)
    own = [kw for what, _, _, kw, *_ in asked if what == "backbone evaluation (its own pooling)"]
    assert own == [{"sts": True, "transfer": False, "threads": 1, "gpus": 0.0, "pooler": "avg"}]
    assert out["backbone_own"]["pooler"] == "avg"
    lines = _test_results(ReportInputs("t", cfg, [], [], None, None, {"avg": 70.0}, backbone={"avg": 61.0},
                                       backbone_own=out["backbone_own"]))
    rows = lines[2].splitlines()  # header, rule, then the rows: the starting model as its users run it first
    assert rows[2].startswith(f"| pre-trained {base} with its own mean pooling (as its users run it) |")
    assert rows[3].startswith(f"| pre-trained {base} (no SimCSE, for reference) |")
