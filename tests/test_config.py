
import pytest

from sparsecse import SparseCSEError
from sparsecse.core.config import config_from_dict, load_config


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["train.lr=1e-4", "sweep.sparsities=[0, 0.1]", "model.pooler=avg"])
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(p)
    assert again == cfg
    assert again.train.lr == 1e-4 and again.sweep.sparsities == (0.0, 0.1)


def test_a_bad_value_in_a_file_names_the_file_and_the_key(tmp_path):
    p = tmp_path / "study.yaml"
    p.write_text("train:\n  precision: fp16\n")
    with pytest.raises(SparseCSEError) as e:
        load_config(p)
    assert "study.yaml" in str(e.value) and "train.precision" in str(e.value) and "fp32, bf16" in str(e.value)


def test_repository_sweep_configs_load():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[1].glob("sweeps/*.yaml"))
    assert {f.stem for f in files} >= {"quickstart", "minilm-full", "paper-bert-base", "paper-bert-large", "paper-roberta-base"}
    for f in files:
        load_config(f)


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("bogus.x=1", "bogus: unknown section"),
    ("sweep.sparsities=[0.1, 1.0]", "sweep.sparsities"),
    ("sweep.lams=[1.5]", "sweep.lams"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.pooler=max", "model.pooler"),
    ("train.lr=abc", "train.lr"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(SparseCSEError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


def test_invalid_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: [1,\n")
    with pytest.raises(SparseCSEError, match="bad.yaml"):
        load_config(p)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(SparseCSEError):
        config_from_dict({"train": 3})


def test_trials_and_scoring_compute_on_the_gpu_ray_gives_them(monkeypatch):
    import torch

    from sparsecse.run.stages import task_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert task_device(0.2) == "cuda" and task_device(1) == "cuda"
    assert task_device(0) == "cpu"  # a CPU trial stays on the CPU even where a GPU exists
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert task_device(0) == "cpu"
    with pytest.raises(SparseCSEError, match=r"node .*: Ray gave this task 0.2 GPU but torch .* cannot use CUDA"):
        task_device(0.2)  # never a silent CPU fallback while holding a GPU


def test_resume_accepts_a_sweep_saved_before_a_defaulted_field_existed():
    from sparsecse.core.config import load_config
    from sparsecse.run.rundir import stage1_fingerprint as _stage1_fp, upgrade_state

    cfg = load_config("sweeps/quickstart.yaml")
    old = cfg.to_dict()
    del old["train"]["precision"]  # as sweep.json was written before train.precision was added
    state = {"config": old, "train_fp": _stage1_fp(old), "score_fp": "x"}
    assert upgrade_state(state, cfg)
    assert state["config"] == cfg.to_dict() and state["train_fp"] == _stage1_fp(cfg.to_dict())  # stage 1 kept
    assert state["score_fp"] == "x"
    # a saved sweep whose values differ is still a different sweep
    other = load_config("sweeps/quickstart.yaml", ["train.lr=1e-4"]).to_dict()
    assert not upgrade_state({"config": other, "train_fp": _stage1_fp(other)}, cfg)
    # the new field set to a non-default value is a different sweep too
    assert not upgrade_state({"config": old}, load_config("sweeps/quickstart.yaml", ["train.precision=bf16"]))
    # a stale stage-1 fingerprint is not blessed by the upgrade
    stale = {"config": dict(old), "train_fp": "stale"}
    assert upgrade_state(stale, cfg) and stale["train_fp"] == "stale"


def test_asha_is_measured_in_training_steps_and_never_judges_a_finished_trial():
    from sparsecse.run.ray_adapter import rung
    from sparsecse.run.ray_adapter import asha_settings

    assert asha_settings(load_config(None)) is None
    a = asha_settings(load_config(None, ["sweep.scheduler=asha", "train.eval_steps=125", "train.max_steps=15625"]))
    assert a == {"grace": 250, "max_t": 15625, "rf": 3}  # grace: two evaluations; rungs up to the step budget
    # intermediate evaluations carry the clock; the last training evaluation and the final test report do not
    assert rung({"step": 250, "last": False}) == {"rung_step": 250}
    assert rung({"step": 15625, "last": True}) == {} and rung({"done": True, "step": 15625}) == {}


def test_optuna_search_settings_are_checked():
    from sparsecse import SparseCSEError
    from sparsecse.core.config import load_config
    from sparsecse.core.results import Point
    from sparsecse.run.checks import check_config
    from sparsecse.run.ray_adapter import search_space

    cfg = load_config(None, ["sweep.search=optuna", "sweep.num_samples=5", "sweep.sparsity_range=[0.02, 0.4]",
                             "sweep.seeds=[3, 4]"])
    sp = search_space(cfg)
    assert sp["space"] == {"sparsity": ("loguniform", 0.02, 0.4), "lam": ("choice", [0.25, 0.5, 0.75])}
    assert sp["num_samples"] == 5 and sp["constants"]["seed"] == 3 and sp["constants"]["scorer"] == "align_uniform"
    assert Point(0.1234567, 0.5, 3).name == "s0.123457_l0.50_seed3"  # sampled: 6 decimals
    for bad, key in ((["sweep.sparsity_range=[0.5, 0.1]"], "sweep.sparsity_range"),
                     (["sweep.sparsity_range=[0, 0.1]"], "sweep.sparsity_range"),
                     (["sweep.search=optuna", "sweep.scorers=[align_uniform, random]"], "sweep.scorers"),
                     (["sweep.lam_range=[0.9, 0.1]"], "sweep.lam_range"),
                     (["sweep.num_samples=0"], "sweep.num_samples")):
        with pytest.raises(SparseCSEError, match=key):
            load_config(None, bad)
    with pytest.raises(SparseCSEError, match="score.normalize: one value with sweep.search=optuna"):
        check_config(load_config(None, ["sweep.search=optuna", "score.normalize=[none, layer]"]))


def test_score_readings_run_exactly_the_listed_readings_of_the_paper_score():
    """score.readings: the paper's formula and StarK's side by side, without the two mixed readings a
    combine × normalize grid would add; the controls run under each normalize value."""
    from sparsecse.core.config import config_from_dict
    from sparsecse.core.results import grid_points

    cfg = load_config(None, ["score.combine=[gradient, score]", "score.normalize=[none, layer]",
                             "score.readings=[[gradient, none], [score, layer]]", "sweep.sparsities=[0, 0.1]",
                             "sweep.lams=[0.5]", "sweep.scorers=[align_uniform, random]"])
    got = sorted((p.scorer, p.combine, p.normalize) for p in grid_points(cfg) if p.sparsity)
    assert got == [("align_uniform", "gradient", "none"), ("align_uniform", "score", "layer"),
                   ("random", "gradient", "layer"), ("random", "gradient", "none")]
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SparseCSEError, match="score.readings"):
        load_config(None, ["score.readings=[[gradient, none], [score, layer]]"])  # combine/normalize disagree
    with pytest.raises(SparseCSEError, match="score.readings"):
        load_config(None, ["score.readings=[[gradient, sideways]]"])


def test_fields_no_shipped_sweep_sets_still_do_what_they_say(tmp_path, monkeypatch):
    """Config fields that only a user's YAML sets each reach the code they configure: the optimiser's weight decay,
    the evaluation batch, the export when the control wins, the search's sparsity scale and seed, the W&B project."""
    import torch

    from sparsecse.core.storage import Storage
    from sparsecse.method.train import make_optimizer
    from sparsecse.run import stages
    from sparsecse.run.outcome import wants_export
    from sparsecse.run.ray_adapter import search_space
    from sparsecse.run.tracking import Tracking
    from sparsecse.study.select import select
    from sparsecse.core.results import DEV, Point, TrialResult, metric_key

    cfg = load_config(None, ["train.weight_decay=0.01"])
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.train.lr, cfg.train.weight_decay, "cpu")
    assert opt.param_groups[0]["weight_decay"] == 0.01

    seen = []
    monkeypatch.setattr(stages, "evaluate_sts", lambda enc, d, **kw: seen.append(kw["batch_size"]) or {
        "align": 0.1, "uniform": -2.0, "avg": 1.0})
    monkeypatch.setattr(stages, "predictions_to_bytes", lambda preds: b"")
    stages.evaluate_trial(None, load_config(None, ["eval.batch_size=7", "sweep.select=best_dev", "sweep.select_on=stsb-dev"]), tmp_path, Storage(tmp_path / "r"), "t")
    assert seen == [7]

    won = select([TrialResult(Point(s, 0.5, 1), {"evaluated": True, DEV: 80.0 - 10 * s, metric_key("test", "avg"): 70.0},
                              None, "ckpt") for s in (0.0, 0.2)])
    assert won.control_won
    assert wants_export(won, load_config(None)) is True  # default: the control is exported when it wins
    assert wants_export(won, load_config(None, ["sweep.when_control_wins=export_nothing"])) is False

    opt_cfg = ["sweep.search=optuna", "sweep.num_samples=4", "sweep.sparsity_range=[0.02, 0.4]"]
    assert search_space(load_config(None, opt_cfg + ["sweep.sparsity_scale=uniform"]))["space"]["sparsity"][0] == "uniform"
    assert search_space(load_config(None, opt_cfg + ["sweep.search_seed=99"]))["seed"] == 99

    tr = Tracking(load_config(None, ["sweep.loggers=[tensorboard, wandb]", "sweep.wandb_project=my-proj"]),
                  Storage(tmp_path / "w"))
    assert tr.logger_settings()["wandb"]["project"] == "my-proj"
