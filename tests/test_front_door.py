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


def _based_model(tiny_model_dir, tmp_path):
    """The tiny model as a sentence-transformers base would be published: its max_seq_length, a Normalize step, a
    card with a license."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "sentence_bert_config.json").write_text('{"max_seq_length": 64, "do_lower_case": false}')
    (base / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (base / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someone/tiny-bert\n---\n# tiny\n")
    return base


def test_the_export_is_hub_ready_cards_metadata_settings_and_no_local_paths(tiny_model_dir, tmp_path):
    import numpy as np
    import torch
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from sentence_transformers import SentenceTransformer

    from sparsecse.method.model import load_encoder
    from sparsecse.ops.export import export_model

    base = _based_model(tiny_model_dir, tmp_path)
    enc = load_encoder(str(base), pooler="cls")
    heads = torch.ones_like(enc.head_mask)
    heads[0, 1] = 0
    enc.set_masks(heads, None)
    out = export_model(enc, tmp_path / "export", pooler="cls_before_pooler",
                       meta={"pretrained": str(base), "sparsity": 0.1, "lam": 0.5, "scores": str(tmp_path / "s.pq")},
                       results={"STSBenchmark": 81.25, "SICKRelatedness": 70.5, "avg": 75.9})
    for d, pruned in ((out, False), (out / "pruned", True)):
        text = (d / "README.md").read_text()
        assert str(tmp_path) not in text  # no path of the exporting machine
        card = ModelCard(text)
        data = card.data.to_dict()
        assert data["license"] == "apache-2.0" and data["base_model"] == "someone/tiny-bert"
        assert data["pipeline_tag"] == "sentence-similarity" and "sentence-transformers" in data["tags"]
        assert ("custom_code" in data["tags"]) == pruned
        name, results = model_index_to_eval_results(data["model-index"])
        assert {r.dataset_type: r.metric_value for r in results} == {"mteb/stsbenchmark-sts": 0.8125,
                                                                     "mteb/sickr-sts": 0.705}
        assert "## Limitations" in text and "## Citation" in text and "transformers " in text
        st = SentenceTransformer(str(d), device="cpu", trust_remote_code=pruned)
        assert st.max_seq_length == 64  # the base's, not the library default
        assert type(st[-1]).__name__ == "Normalize"
        emb = st.encode(["a man plays a guitar", "the cat sleeps"])
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_push_to_hub_uploads_the_pruned_model_and_refuses_without_a_token(tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    """`export --push-to-hub`: the upload goes through huggingface_hub (its HfApi calls recorded here — there is no
    network); without a token the command refuses before exporting anything."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: calls.append(("create", repo, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw)) or type("I", (), {"commit_url": "u"})())
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "e1"), "--push-to-hub", "me/m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Hugging Face token" in err[0] and not (tmp_path / "e1").exists() and not calls
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "e2"), "--push-to-hub", "me/m",
                 "--private"]) == 0
    assert calls[0] == ("create", "me/m", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(tmp_path / "e2" / "pruned") and calls[1][1]["repo_id"] == "me/m"
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "e3"), "--push-to-hub", "no-owner"]) == 2
