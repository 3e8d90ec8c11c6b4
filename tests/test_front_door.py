"""What a user meets before any code: every command's help (a description, an example, help for every argument),
and `sparsecse show` — a finished run's answer again, a live run's progress."""

from __future__ import annotations

import argparse
import json

from sparsecse.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield f"{path} {name}".strip(), sp
                yield from _commands(sp, f"{path} {name}".strip())


def test_every_command_has_a_description_an_example_and_help_for_every_argument():
    parser = build_parser()
    assert "plan" in parser.format_help() and "k8s-submit" in parser.format_help() and "show" in parser.format_help()
    missing = []
    for name, sp in _commands(parser):
        if not sp.description:
            missing.append(f"{name}: description")
        if not (sp.epilog or "").startswith("example:\n  sparsecse "):
            missing.append(f"{name}: example")
        missing += [f"{name} {(a.option_strings or [a.dest])[0]}" for a in sp._actions
                    if not a.help and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    assert missing == []


def test_bare_sparsecse_says_what_is_missing_once(capsys):
    try:
        main([])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsecse: error: the following arguments are required")


def _finished_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "sweep.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({
        "answer": "Chosen: **SparseCSE at s=10%, λ=0.5** — 20.1 M encoder parameters. Chosen on clean dev by "
                  "`sweep.select: safe`.", "export": str(run / "export"), "report": str(run / "report.html")}))
    (run / "results.json").write_text(json.dumps({"trials": [
        {"trial": "s0.100_l0.50_seed1", "status": "done", "sparsity": 0.1, "lam": 0.5, "seed": 1,
         "choice/all": 79.1, "best_stsb_dev": 80.2, "test/avg": 73.0}]}))
    return run


def test_show_prints_the_answer_where_the_model_is_and_how_to_load_it(tmp_path, capsys):
    run = _finished_run(tmp_path)
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Chosen: SparseCSE at s=10%, λ=0.5 — 20.1 M encoder parameters.")  # no markdown marks
    assert f'SentenceTransformer("{run}/export/pruned", trust_remote_code=True)' in out
    assert main(["show", str(run), "--trials"]) == 0
    assert "| s0.100_l0.50_seed1 | done | 10% |" in capsys.readouterr().out
    assert main(["show", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["export"] == str(run / "export")


def test_show_on_a_live_run_says_how_far_it_is_and_on_a_folder_without_a_sweep_one_line(tmp_path, capsys):
    run = tmp_path / "live"
    (run / "tune" / "trial_0").mkdir(parents=True)
    (run / "tune" / "trial_0" / "result.json").write_text("{}\n")
    (run / "sweep.json").write_text(json.dumps({"train_fp": "x", "score_fp": None}))
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "not finished" in out and "stage 1 done, scoring not done, 1 trial(s) reporting" in out
    (tmp_path / "empty").mkdir()
    assert main(["show", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no sweep" in err[0]
