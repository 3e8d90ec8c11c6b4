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
    # a step can be no faster than the measured launch floor, nor than its FLOPs at the stated MFU
    from sparsecse.run.plan import GPU_MFU, LAUNCH_S_PER_LAYER

    assert base.step_s_trial >= max(12 * LAUNCH_S_PER_LAYER, base.flops_per_step / (GPUS["h100"].peak_fp32 * GPU_MFU))


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
    by_time = _plan("paper-bert-large.yaml", "train.checkpoint_every=30m")
    often = _plan("paper-bert-large.yaml", "train.checkpoint_every=30m", "train.eval_steps=25")
    assert by_time.upload_bytes_trial == often.upload_bytes_trial  # 5× the evaluations, the same uploads
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
