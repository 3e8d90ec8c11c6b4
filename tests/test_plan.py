"""`sparsecse plan`: the arithmetic of a sweep's cost — trials, steps, FLOPs, concurrency, checkpoint bytes — on
the paper configs and the quickstart, and the command's one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsecse.core.config import load_config
from sparsecse.run.plan import GPUS, Shape, make_plan, model_shape, render

REPO = Path(__file__).resolve().parents[1]
PER_THREAD = 30e9  # a fixed CPU peak: the arithmetic below does not depend on this machine's


def _plan(name: str, *sets: str, gpu: str = "h100", gpus: int | None = 8, data_dir=None):
    return make_plan(load_config(REPO / "sweeps" / name, list(sets)), data_dir, gpu, gpus, per_thread=PER_THREAD)


def test_the_paper_grid_on_bert_base_counts_its_trials_steps_and_evaluations():
    p = _plan("paper-bert-base.yaml")
    assert p.trials == 1 + 14 * 3  # s = 0 once, 14 sparsities × 3 λ
    assert p.sentences == 1_000_000 and p.steps_trial == p.steps_stage1 == 15_625  # one epoch at batch 64
    assert p.evals_trial == 125  # STS-B dev every 125 steps
    assert p.params == pytest.approx(110e6, rel=0.02)  # bert-base (+ the MLP pooler trained with it)
    two_seeds = _plan("paper-bert-base.yaml", "sweep.seeds=[1, 2]")
    assert two_seeds.trials == 2 * p.trials
    controls = _plan("paper-bert-base.yaml", "sweep.scorers=[align_uniform, random]")
    assert controls.trials == p.trials + 14  # random ignores λ: one trial per sparsity


def test_flops_per_step_follow_the_model_shape_and_the_tokens():
    base, large = _plan("paper-bert-base.yaml"), _plan("paper-bert-large.yaml")
    b, lg = Shape(12, 768, 3072, 12, 30522), Shape(24, 1024, 4096, 16, 30522)
    t = base.tokens_per_sentence
    assert base.flops_per_step == pytest.approx(3 * b.fwd_flops_per_token(t) * 2 * 64 * t)
    assert large.flops_per_step / base.flops_per_step == pytest.approx(
        lg.fwd_flops_per_token(t) / b.fwd_flops_per_token(t))
    # one trial's step is its launch floor plus its FLOPs at the stated MFU (train.precision auto: bf16 on a GPU,
    # fp32 when pinned), never the larger of the two alone; two trials packed on a GPU overlap, never add
    from sparsecse.run.plan import GPU_MFU, LAUNCH_S_PER_LAYER

    floor = 12 * LAUNCH_S_PER_LAYER
    one = _plan("paper-bert-base.yaml", "sweep.trial_gpus=1")
    assert one.step_s_trial == pytest.approx(floor + one.flops_per_step / (GPUS["h100"].peak_bf16 * GPU_MFU))
    fp32 = _plan("paper-bert-base.yaml", "sweep.trial_gpus=1", "train.precision=fp32")
    assert fp32.step_s_trial == pytest.approx(floor + fp32.flops_per_step / (GPUS["h100"].peak_fp32 * GPU_MFU))
    assert base.step_s_trial == pytest.approx(max(floor + one.flops_per_step / (GPUS["h100"].peak_bf16 * GPU_MFU),
                                                  2 * one.flops_per_step / (GPUS["h100"].peak_bf16 * GPU_MFU)))


def test_plan_models_the_all_reduce_and_recommends_a_worker_count():
    """Data-parallel stage 1 pays a ring all-reduce of the fp32 gradients per step over the node's link: over
    PCIe (A10G, g5) at batch 64 it costs more than splitting the batch saves, so plan recommends one worker; at
    batch 512 (the RoBERTa config) four; the shipped paper configs follow the plan on the cluster files' g5.12xlarge."""
    from sparsecse.run.plan import allreduce_s, recommend

    base = _plan("paper-bert-base.yaml", "ray.num_workers=4", gpu="a10g", gpus=8)
    params = base.params
    assert base.comm_s_stage1 == pytest.approx(2 * 3 / 4 * 4 * params / 25e9)
    assert allreduce_s(params, 1, GPUS["a10g"]) == 0
    assert allreduce_s(params, 4, GPUS["h100"]) < base.comm_s_stage1 / 10  # NVLink
    by = {w: (s, c) for w, s, c in base.worker_options}
    assert sorted(by) == [1, 2, 4, 8] and by[4][1] == pytest.approx(base.comm_s_stage1)
    assert base.step_s_stage1 == pytest.approx(by[4][0]) and by[1][1] == 0
    assert base.recommended_workers == 1 and by[1][0] < by[4][0]
    shown = render(base)
    assert "recommended ray.num_workers: 1 (configured: 4)" in shown and "all-reduce" in shown and "PCIe" in shown
    assert recommend([[1, 1.0, 0], [2, 0.95, 0.1], [4, 0.5, 0.2]]) == 4
    assert recommend([[1, 1.0, 0], [2, 0.95, 0.1]]) == 1  # within 10 %: the fewer GPUs
    assert _plan("paper-bert-base.yaml", gpu="cpu", gpus=None).recommended_workers is None  # no GPU, no advice
    for name in ("paper-bert-base.yaml", "paper-bert-large.yaml", "paper-roberta-base.yaml"):
        p = _plan(name, gpu="a10g", gpus=4)
        assert p.recommended_workers == p.workers, name


def test_trials_that_share_a_gpu_run_together_and_a_too_full_gpu_is_flagged():
    assert _plan("paper-bert-base.yaml").concurrency == 16  # the shipped config: two trials per GPU
    one = _plan("paper-bert-base.yaml", "sweep.trial_gpus=1")
    two = _plan("paper-bert-base.yaml", "sweep.trial_gpus=0.5")
    assert (one.concurrency, two.concurrency) == (8, 16)
    # sharing never makes a trial's step faster, and never the whole sweep slower than running them one per GPU
    assert two.step_s_trial >= one.step_s_trial and two.wall_s <= one.wall_s * 1.01
    assert any("2 trials share each GPU" in n for n in two.notes)
    crowded = _plan("paper-bert-large.yaml", "sweep.trial_gpus=0.1", gpu="l4")
    assert any(n.startswith("WARNING") and "24 GB" in n for n in crowded.notes)
    capped = _plan("paper-bert-base.yaml", "sweep.trial_gpus=0.5", "sweep.max_concurrent_trials=4")
    assert capped.concurrency == 4


def test_checkpoint_bytes_follow_the_policy_not_the_evaluations():
    w = 4 * _plan("paper-bert-large.yaml").params
    by_time = _plan("paper-bert-large.yaml", "train.checkpoint_every=10m")
    often = _plan("paper-bert-large.yaml", "train.checkpoint_every=10m", "train.eval_steps=25")
    # 5× the evaluations, uploads only as the trial's minutes grow (each evaluation adds a little to them)
    assert often.trial_s > by_time.trial_s and by_time.checkpoints_trial >= 1
    assert often.upload_bytes_trial - by_time.upload_bytes_trial == (
        often.checkpoints_trial - by_time.checkpoints_trial) * 4 * w
    assert often.checkpoints_trial <= by_time.checkpoints_trial * often.trial_s / by_time.trial_s + 1
    assert by_time.upload_bytes_trial == w + by_time.checkpoints_trial * 4 * w
    every = _plan("paper-bert-large.yaml", "train.checkpoint_every=1")
    assert every.checkpoints_trial == every.evals_trial - 1 and every.upload_bytes_trial == every.upload_bytes_every_eval
    assert by_time.upload_bytes_every_eval > 50 * by_time.upload_bytes_trial


def test_the_quickstart_plan_on_this_cpu_reads_the_corpus_and_the_local_model(tiny_data_dir):
    p = _plan("quickstart.yaml", gpu="cpu", gpus=None, data_dir=tiny_data_dir)
    assert p.sentences == 256 and p.trials == 5 + 2 and p.gpu_hours == 0  # + the control's two extra retrainings
    assert p.steps_trial == 256 // 32 and p.evals_trial == 1  # the tiny corpus ends the epoch before max_steps 16
    assert p.concurrency == 2 and p.params == pytest.approx(22.9e6, rel=0.02)  # MiniLM from its config.json
    assert 2 <= p.tokens_per_sentence <= 32 and p.checkpoints_trial == 0
    text = render(p)
    assert "[plan] trials" in text and "7, 2 at a time" in text and "GPU-hours" in text


def test_plan_command_prints_the_plan(capsys):
    from sparsecse.cli import main

    assert main(["plan", str(REPO / "sweeps" / "paper-bert-base.yaml"), "--gpu", "h100", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "bert-base-uncased" in out and "43, 16 at a time" in out and "15,625 steps" in out
    assert main(["plan", str(REPO / "sweeps" / "paper-bert-base.yaml"), "--gpu", "a100", "--gpus", "4", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["concurrency"] == 8  # 4 GPUs, two trials each


def test_model_shape_of_a_local_directory_and_of_a_known_hub_name(tiny_model_dir):
    local = model_shape(str(tiny_model_dir))
    assert local.layers >= 1 and local.hidden > 0
    assert model_shape("roberta-base").vocab == 50265


def test_a_cpu_stage1_with_gpu_trials_is_planned_on_both(tiny_data_dir):
    """Stage 1 on CPUs (ray.use_gpu false) and trials on GPUs: each part on its own hardware (the sweep once
    crashed here dividing by a CPU peak it had not measured)."""
    p = make_plan(load_config(REPO / "sweeps" / "quickstart.yaml", ["sweep.trial_gpus=1"]), tiny_data_dir, "h100", 1)
    assert p.step_s_stage1 > p.step_s_trial > 0 and p.wall_s > 0


def test_the_sweeps_plan_uses_the_gpu_type_the_cluster_reports(capsys, tmp_path):
    """The plan printed before a sweep is for the GPUs Ray reports (accelerator_type:A10G → a10g, A100-80G → a100,
    H200 → h200), not always an H100; a type it does not know is planned as an H100 and says so."""
    from types import SimpleNamespace

    from sparsecse.run.checks import print_plan
    from sparsecse.run.plan import gpu_type

    assert gpu_type({"GPU": 4, "accelerator_type:A10G": 1}) == "a10g"
    assert gpu_type({"accelerator_type:A100-80G": 1}) == "a100" and gpu_type({"accelerator_type:H200": 1}) == "h200"
    assert gpu_type({"accelerator_type:T4": 1}) is None and gpu_type({"GPU": 1}) is None

    written = {}
    run = SimpleNamespace(cfg=load_config(REPO / "sweeps" / "paper-bert-base.yaml"), data_dir=str(tmp_path),
                          store=SimpleNamespace(write_json=lambda name, obj: written.update({name: obj})))
    print_plan(run, {"GPU": 4, "CPU": 48, "accelerator_type:A10G": 1})
    out = capsys.readouterr().out
    assert "4 × NVIDIA A10G" in out and "recommended ray.num_workers: 1" in out
    assert written["plan.json"]["recommended_workers"] == 1
    print_plan(run, {"GPU": 4, "CPU": 48, "accelerator_type:T4": 1})
    out = capsys.readouterr().out
    assert "NVIDIA H100" in out and "GPU type T4: not one the plan knows; planned as an H100" in out
