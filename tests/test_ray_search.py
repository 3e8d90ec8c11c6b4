"""Ray, more of it: 2-worker = 1-worker training, controls and both readings, ASHA, Optuna + Pareto + tracking,
stage-1 replicates, the default selection end to end. Each a sweep of its own on the tiny model (slow); split from
tests/test_ray.py so the parallel suite balances its two longest files."""

from __future__ import annotations

import json

import pytest
import torch

from sparsecse.core.checkpoints import best_model
from sparsecse.core.storage import Storage
from test_ray import _sweep, _write_cfg

pytestmark = pytest.mark.slow


def test_two_worker_ray_train_equals_one_worker(tmp_path, tiny_model_dir, tiny_data_dir):
    from sparsecse.run import ray_adapter as ra
    from sparsecse.core.config import load_config
    from sparsecse.method.model import load_encoder
    from sparsecse.method.train import train_simcse
    from sparsecse.run.stages import train_loop
    from sparsecse.core.storage import Storage

    cfg = load_config(_write_cfg(tmp_path / "c.yaml", tiny_model_dir), ["train.dropout=0.0", "train.max_steps=3",
                                                                       "train.eval_steps=3"])
    # a corpus that leaves a remainder (67 = 8 × 8 + 3) for two epochs: the last batch of each epoch is cut to a
    # multiple of the two workers, so the all-gather of negatives never sees unequal slices (it hung or crashed)
    ragged = cfg.replace(data=type(cfg.data)(**{**cfg.to_dict()["data"], "max_train_sentences": 67}),
                         train=type(cfg.train)(**{**cfg.to_dict()["train"], "max_steps": None, "epochs": 2,
                                                  "eval_steps": 9}))
    # one worker: the same loop in this process (what Ray Train's single worker runs), the reference for two
    outs = {"n1": load_encoder(str(train_simcse(cfg, tmp_path / "n1", tiny_data_dir, progress=False).best_dir)
                               ).backbone.state_dict()}
    ra.connect(None, 2, dashboard=False)
    try:
        for n, c, name in ((2, cfg, "n2"), (2, ragged, "ragged")):
            store = Storage(tmp_path / name)
            ckpt = ra.run_torch_trainer(train_loop, {"config": c.to_dict(), "data_dir": str(tiny_data_dir),
                                                     "storage": store.uri, "cpus_per_worker": 1},
                                        num_workers=n, use_gpu=False, cpus_per_worker=1, storage=store, name=name,
                                        max_failures=0)
            # the run's only evaluation is its last step: its best model holds the final weights
            outs[name] = load_encoder(str(tmp_path / name / best_model(store, ckpt))).backbone.state_dict()
            if name == "ragged":  # every epoch ran to its end: 9 batches each (the last one 2 of the 3 left)
                hist = json.loads((tmp_path / name / ckpt / "history.json").read_text())["history"]
                assert [h["step"] for h in hist] == [9, 18]
    finally:
        ra.shutdown()
    outs[1], outs[2] = outs["n1"], outs["n2"]
    init = load_encoder(str(tiny_model_dir)).backbone.state_dict()
    # compare the updates (final − initial): Adam normalises each coordinate, so float summation-order noise in
    # coordinates whose gradient is ~0 can move them by up to lr; the update as a whole must agree
    d1 = torch.cat([(outs[1][k] - init[k]).flatten() for k in init])
    d2 = torch.cat([(outs[2][k] - init[k]).flatten() for k in init])
    assert d1.norm() > 0
    rel = float((d1 - d2).norm() / d1.norm())
    assert rel < 1e-2, rel
    assert float(torch.nn.functional.cosine_similarity(d1, d2, dim=0)) > 0.9999


def test_sweep_with_controls_and_both_readings_runs_every_method_and_reports_comparisons(tmp_path, tiny_model_dir,
                                                                                        tiny_data_dir):
    """sweep.scorers=[align_uniform, random, magnitude, simcse] × score.normalize=[none, layer] (the paper's open
    reading as a grid dimension), one seed: each method trains at the same budget; with a single seed the controls
    table rests on a paired bootstrap over the STS test pairs (each trial's predictions are stored for it);
    selection stays among the paper's points — each reading its own — and the s = 0 control."""
    cfg = _write_cfg(tmp_path / "c.yaml", tiny_model_dir, sparsities=(0.0, 0.3), lams=(0.5,))
    r = _sweep(cfg, tmp_path / "run", tiny_data_dir, "--set", "sweep.seeds=[1]",
               "--set", "sweep.scorers=[align_uniform,random,magnitude,simcse]", "--set", "score.normalize=[none,layer]",
               "--set", "sweep.pilot=true")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    got = sorted((t["sparsity"], t["scorer"], t["normalize"]) for t in res["trials"])
    assert got == sorted([(0.0, "align_uniform", "none")] + [(0.3, m, n) for m in
                          ("align_uniform", "random", "magnitude", "simcse") for n in ("none", "layer")])
    assert all(t["status"] == "done" for t in res["trials"]) and len({t["trial"] for t in res["trials"]}) == 9
    methods = {c["method"] for c in res["comparisons"]}
    assert methods == {f"{m}{x}" for m in ("align_uniform", "random", "magnitude", "simcse")
                       for x in ("", " (normalize=layer)")}
    for c in res["comparisons"]:  # one seed: the test is the bootstrap over test pairs, Holm-adjusted in the table
        b, vs = c["vs_control"]["bootstrap"], c["vs_control"]
        assert vs["n"] == 1 and b["lo"] <= b["hi"] and vs["p_raw"] == b["p"] and vs["p"] >= b["p"]
        assert vs["verdict"] == ("within noise" if vs["p"] >= 0.05 else "better" if vs["diff"] > 0 else "worse")
        assert b["diff"] == pytest.approx(c["mean"] - res["control"]["test"]["avg"], abs=1e-9)
    trials = {t["trial"] for t in res["trials"]}
    assert "s0.300_l0.50_norm-layer_seed1" in trials and "s0.300_random_norm-layer_seed1" in trials
    preds = {p.name for p in (tmp_path / "run" / "predictions").glob("*.parquet")}
    assert preds == {f"{t}.parquet" for t in trials} | {f"{t}.dev.parquet" for t in trials}
    # one seed, one replicate: the default noninferior rule tested each sparsity on the dev pairs themselves
    steps = res["selected"]["rule_detail"]["steps"]
    assert steps and all(s["test"] == "one-sided bootstrap over dev pairs" and s["n"] == 1 for s in steps)
    # each trial trained under its own reading's mask: the one select_masks gives for it from the shared scores
    from sparsecse.method.model import load_encoder
    from sparsecse.method.prune import select_masks
    from sparsecse.method.score import load_scores

    scores = load_scores(tmp_path / "run" / "scores.parquet")
    by = {t["trial"]: t for t in res["trials"]}
    for name, normalize in (("s0.300_l0.50_seed1", "none"), ("s0.300_l0.50_norm-layer_seed1", "layer")):
        best = tmp_path / "run" / best_model(Storage(str(tmp_path / "run")), by[name]["checkpoint"])
        assert json.loads((best / "sparsecse.json").read_text())["normalize"] == normalize
        hm, nm = select_masks(*scores.importance(0.5, "gradient", normalize), 0.3)
        enc = load_encoder(str(best))
        assert torch.equal(enc.head_mask, hm.to(enc.head_mask)) and torch.equal(enc.neuron_mask, nm.to(enc.neuron_mask))
    sel = res["selected"]
    assert sel["candidates"] == 3 and (sel["sparsity"], sel["control_won"]) in ((0.0, True), (0.3, False))
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Controls at equal budget" in md and "| 30% | magnitude (normalize=layer) |" in md
    assert "score.normalize = none | layer (a grid dimension" in md and "bootstrap over test pairs" in md
    assert "## Pilot study" in md and len(res["pilot"]) == 16  # 4 scorers × 2 readings × {0, 30 %}, stage-1 model
    assert (tmp_path / "run" / "scores_simcse.parquet").exists()  # SimCSE's own InfoNCE scores, beside the paper's
    assert "| pre-trained " in md and "pre-trained backbone: align" in md and res["backbone"]["avg"] > 0
    assert (tmp_path / "run" / "figures" / "pilot.png").exists() and "## Stability" in md
    assert (tmp_path / "run" / "export" / "manifest.json").exists()  # the selection is exported, control or not
    if not sel["control_won"]:
        assert "## Where the selected mask prunes" in md and (tmp_path / "run" / "figures" / "mask_allocation.png").exists()
        assert f"normalize = {sel['normalize']}" in md


def test_asha_stops_a_weak_trial_a_diverging_one_fails_and_selection_and_export_still_work(tmp_path, tiny_model_dir,
                                                                                            tiny_data_dir):
    """ASHA measured in training steps, one trial at a time: the first trial (nothing to compare with) runs its
    whole budget (4 steps) to its final test report — the step budget never cuts a trial short —, a diverging
    second one (learning rate 1e30, injected) fails as non-finite and is never chosen, and a clearly weak third one
    (it reports dev -100, injected) is stopped at the first rung (grace = 2 steps). The sweep still writes its
    report and export, names the stopped and the failed trial, and exits 1 with one line: failures are not success."""
    cfg = _write_cfg(tmp_path / "c.yaml", tiny_model_dir, sparsities=(0.1, 0.2, 0.3), lams=(0.5,))
    r = _sweep(cfg, tmp_path / "run", tiny_data_dir, "--set", "sweep.scheduler=asha", "--set", "sweep.asha_grace_steps=2",
               "--set", "sweep.asha_reduction_factor=2", "--set", "sweep.max_concurrent_trials=1",
               "--set", "sweep.export_onnx=true", "-v",  # -v: Tune's own tables on the console, as before
               env={"SPARSECSE_FAULT": "trial-poor:s0.300_l0.50_seed1,trial-nan:s0.200_l0.50_seed1"})
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("sparsecse: error: 1 of 3 trials failed (first: s0.200_l0.50_seed1") and "non-finite" in last
    assert "sparsity" in r.stdout and "scorer" in r.stdout  # Tune's table (-v) names the parameters
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    status = {t["trial"]: (t["status"], t["steps"]) for t in res["trials"]}
    assert status["s0.100_l0.50_seed1"] == ("done", 4) and status["s0.300_l0.50_seed1"] == ("incomplete", 2)
    bad = next(t for t in res["trials"] if t["sparsity"] == 0.2)
    assert bad["status"] == "error" and "non-finite" in bad["error"]
    assert res["selected"]["sparsity"] == 0.1 and (tmp_path / "run" / "export" / "manifest.json").exists()
    # sweep.export_onnx: the export carries the ONNX files, measured on the run's data in its model card
    assert (tmp_path / "run" / "export" / "pruned" / "onnx" / "model_qint8.onnx").is_file()
    assert "| onnx/model_qint8.onnx |" in (tmp_path / "run" / "export" / "README.md").read_text()
    md = (tmp_path / "run" / "report.md").read_text()
    assert "ASHA stopped 1 of 3 trials early" in md and "s0.300_l0.50_seed1" in md and "non-finite" in md
    # one TensorBoard stream per trial that reached an evaluation (ours, with per-step loss; the diverging one
    # failed before its first), not a second one from Tune's TBX logger
    assert not list((tmp_path / "run" / "tune").rglob("events.out.tfevents*"))
    assert sorted(p.name for p in (tmp_path / "run" / "tensorboard").glob("s0.*")) == ["s0.100_l0.50_seed1",
                                                                                     "s0.300_l0.50_seed1"]
    assert len(list((tmp_path / "run" / "tune").glob("*/result.json"))) == 3


def test_optuna_pareto_search_with_mlflow_and_wandb_tracking(tmp_path, tiny_model_dir, tiny_data_dir):
    """sweep.search=optuna: Optuna's TPE samples num_samples points of continuous sparsity in sparsity_range and λ
    in lam_range (Tune's table names them); the s = 0 control runs as its own small grid; selection, report
    (scatter + fit) and export work on the sampled points. With sweep.objective=pareto the search has two
    objectives (dev, encoder parameters) and selection takes the smallest model within δ of the best dev. With
    sweep.loggers mlflow + wandb (offline), stage 1, every trial (through Tune's callbacks) and the outcome are
    runs of one MLflow experiment / W&B group in the run."""
    cfg = _write_cfg(tmp_path / "c.yaml", tiny_model_dir, sparsities=(0.0,), lams=(0.5,))
    r = _sweep(cfg, tmp_path / "run", tiny_data_dir, "--set", "sweep.search=optuna", "--set", "sweep.num_samples=3",
               "--set", "sweep.sparsity_range=[0.05, 0.5]", "--set", "sweep.lam_range=[0.2, 0.8]",
               "--set", "sweep.objective=pareto", "--set", "sweep.pareto_delta=1.0",
               "--set", "sweep.loggers=[tensorboard, mlflow, wandb]", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    sampled = [t for t in res["trials"] if t["sparsity"] > 0]
    assert len(sampled) == 3 and len(res["trials"]) == 4 and all(t["status"] == "done" for t in res["trials"])
    assert all(0.05 <= t["sparsity"] <= 0.5 and 0.2 <= t["lam"] <= 0.8 for t in sampled)
    assert len({t["sparsity"] for t in sampled}) == 3 and len({t["trial"] for t in res["trials"]}) == 4
    assert (tmp_path / "run" / "tune-control").is_dir() and (tmp_path / "run" / "tune").is_dir()
    sel = res["selected"]
    assert sel["candidates"] == 4 and sel["objective"] == "pareto"
    # the smallest model among those within δ of the best dev, from the trials' own records
    best = max(t["best_stsb_dev"] for t in res["trials"])
    within = [t for t in res["trials"] if t["best_stsb_dev"] >= best - 1.0]
    assert sel["params"] == min(t["encoder_params"] for t in within) and sel["pareto"]["best_dev"] == best
    assert all(t["encoder_params"] < res["trials"][0]["encoder_params"] for t in sampled)  # trials[0]: s = 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Optuna (TPE) search: 3 samples of sparsity in [0.05, 0.5] (log) and λ in [0.2, 0.8]" in md
    assert "## Pareto front" in md and (tmp_path / "run" / "figures" / "pareto.png").exists()
    assert (tmp_path / "run" / "figures" / "sts_avg_vs_sparsity.png").exists()
    assert (tmp_path / "run" / "export" / "manifest.json").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}")
    from sparsecse.run.tracking import experiment_name

    runs = client.search_runs([client.get_experiment_by_name(experiment_name(str(tmp_path / "run"))).experiment_id])
    stages = sorted(x.data.tags.get("sparsecse.stage") for x in runs)
    assert stages == ["outcome", "stage1"] + ["trial"] * 4
    trial_runs = [x for x in runs if x.data.tags["sparsecse.stage"] == "trial"]
    assert sorted(float(x.data.params["sparsity"]) for x in trial_runs) == sorted(t["sparsity"] for t in res["trials"])
    assert all("best_stsb_dev" in x.data.metrics and "encoder_params" in x.data.metrics for x in trial_runs)
    offline = [p for p in (tmp_path / "run" / "wandb").rglob("offline-run-*") if p.is_dir()]
    assert len(offline) == 6  # stage 1, 4 trials, the outcome


def test_two_stage1_replicates_each_trained_scored_and_pruned_then_resumed_without_rerunning(
        tmp_path, tiny_model_dir, tiny_data_dir):
    """sweep.replicates=2: two stage-1 runs (train.seed, train.seed + 1) trained side by side as parallel Ray Train
    runs, each scored; the control, the paper's point and random per replicate; the report pairs them within a
    replicate and tests over replicates; a resume reruns nothing."""
    cfg = _write_cfg(tmp_path / "c.yaml", tiny_model_dir, sparsities=(0.0, 0.3), lams=(0.5,))
    args = ("--set", "sweep.seeds=[1]", "--set", "sweep.replicates=2", "--set", "sweep.scorers=[align_uniform,random]")
    r = _sweep(cfg, tmp_path / "run", tiny_data_dir, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    for f in ("simcse/best/manifest.json", "simcse-rep1/best/manifest.json", "scores.parquet", "scores-rep1.parquet"):
        assert (run / f).exists(), f
    res = json.loads((run / "results.json").read_text())
    assert sorted(t["trial"] for t in res["trials"]) == sorted(
        ["s0.000_l0.50_seed1", "s0.300_l0.50_seed1", "s0.300_random_seed1",
         "s0.000_l0.50_seed1_rep1", "s0.300_l0.50_seed1_rep1", "s0.300_random_seed1_rep1"])
    assert all(t["status"] == "done" for t in res["trials"])
    devs = [x["best_stsb_dev"] for x in res["replicates"]]
    assert [x["seed"] for x in res["replicates"]] == [42, 43] and devs[0] != devs[1]  # two different SimCSE runs
    from sparsecse.method.score import load_scores

    s0, s1 = (load_scores((run / f).read_bytes()) for f in ("scores.parquet", "scores-rep1.parquet"))
    assert s0.meta["model_fingerprint"] != s1.meta["model_fingerprint"]  # each replicate scored its own model
    assert all(c["unit"] == "replicate" and c["vs_control"]["n"] == 2 for c in res["comparisons"])
    assert "Stage 1 ran 2 independent replicates (train.seed 42, 43)" in (run / "report.md").read_text()
    state = json.loads((run / "sweep.json").read_text())
    assert state["stage_runs"] == {"train": 2, "score": 2}
    (a0, b0), (a1, b1) = state["timings"]["stage1_windows"]["0"], state["timings"]["stage1_windows"]["1"]
    assert a1 < b0 and a0 < b1  # 2 CPUs, 1 per stage-1 run: the two replicates trained at the same time
    assert "stage 1: 2 replicates, 2 at a time" in r.stdout
    r2 = _sweep(cfg, run, tiny_data_dir, *args, "--resume")
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert json.loads((run / "sweep.json").read_text())["stage_runs"] == {"train": 2, "score": 2}


def test_the_default_selection_runs_end_to_end_on_clean_data(tmp_path, tiny_model_dir, tiny_data_dir):
    """The defaults a user gets: the clean selection data (its halves counted in the report, each trial scored on
    the held-out choice half per source and its predictions kept), the control retrained three times, the "safe"
    rule's choice with its reason, and what every rule picks on the same trials."""
    from sparsecse.core.results import metric_key

    cfg = _write_cfg(tmp_path / "c.yaml", tiny_model_dir, sparsities=(0.0, 0.3), lams=(0.5,), pinned="")
    r = _sweep(cfg, tmp_path / "run", tiny_data_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["selected"]["rule"] == "safe" and res["selected"]["rule_detail"]["why"]
    assert {t["trial"] for t in res["trials"]} == {"s0.000_l0.50_seed1", "s0.000_l0.50_seed2", "s0.000_l0.50_seed3",
                                                   "s0.300_l0.50_seed1"}
    for t in res["trials"]:
        assert all(t.get(metric_key("choice", k)) is not None for k in ("all", "stsb-dev", "sickr-dev")), t
        assert (tmp_path / "run" / "predictions" / f"{t['trial']}.choice.parquet").is_file()
    assert set(res["rules"]) == {"safe", "noninferior", "best_dev"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Selection uses **clean dev**" in report and "| STS-B dev | 120 |" in report
    assert "On these trials each rule picks: `safe` →" in report
    # the console is sparsecse's: the plan, the stages, one line per trial, the answer and how to load the model —
    # Tune's tables, the workers' output and Ray's log lines go to RUN/logs/driver.log and Ray's own logs
    out = r.stdout.splitlines()
    assert len(out) < 45 and sum(line.startswith("[trial ") for line in out) == 4, r.stdout
    assert not any("Trial name" in line or "Writing model shards" in line for line in out), r.stdout
    assert any(line.startswith("Chosen: ") for line in out) and any("SentenceTransformer(" in line for line in out)
    assert (tmp_path / "run" / "logs" / "driver.log").is_file()
