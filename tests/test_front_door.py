"""What a user meets before any code: every command's help (a description, an example, help for every argument),
and `sparsecse show` — a finished run's answer again, a live run's progress."""

from __future__ import annotations

import argparse
import json

import pytest

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
    descriptions = {name: sp.description for name, sp in _commands(parser)}
    assert descriptions["eval"] == "Evaluate an encoder on STS (and transfer) tasks."  # its help, names as written


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


def test_when_the_control_wins_show_points_to_the_plain_model_that_needs_no_custom_code(tmp_path, capsys):
    """Nothing pruned: the dense export is the same model and loads without trust_remote_code."""
    run = _finished_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["selected"] = {"control_won": True, "sparsity": 0.0}
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert f'model = SentenceTransformer("{run}/export")' in out and "trust_remote_code" not in out
    assert f"model:  {run}/export (the unpruned control" in out


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


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub at the HTTP layer: huggingface_hub's own client (its create_repo, preupload and commit requests, as
    it builds them) talks to an httpx MockTransport that answers as the Hub does and records every request. No
    network. `fail` names a path suffix that answers 403 (no write access; a 5xx would be retried with back-off)."""
    import json

    import httpx
    import huggingface_hub
    import huggingface_hub.utils._http as hub_http

    state = {"requests": [], "commits": [], "fail": None}

    def handler(req: httpx.Request) -> httpx.Response:
        path = req.url.path
        state["requests"].append((req.method, path, req.headers.get("authorization"), req.content))
        if state["fail"] and path.endswith(state["fail"]):
            return httpx.Response(403, json={"error": "You don't have the rights to create a model under namespace me"})
        if path == "/api/repos/create":
            return httpx.Response(200, json={"url": "https://huggingface.co/me/m", "name": "me/m"})
        if path == "/api/validate-yaml":  # the model card's metadata, which the client sends the Hub to check
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if path.endswith("/preupload/main"):
            files = json.loads(req.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
        if path.endswith("/commit/main"):
            lines = [json.loads(x) for x in req.content.decode().splitlines() if x.strip()]
            state["commits"].append({x["value"]["path"] for x in lines if x.get("key") == "file"})
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/me/m/commit/abc", "commitOid": "abc",
                                             "pullRequestUrl": None})
        return httpx.Response(404, json={"error": f"no such route {req.method} {path}"})

    old = hub_http._GLOBAL_CLIENT_FACTORY
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handler)))
    yield state
    huggingface_hub.set_client_factory(old)


def test_push_to_hub_uploads_the_pruned_model_and_refuses_without_a_token(tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys, fake_hub):
    """`export --push-to-hub`: huggingface_hub's requests, checked at the HTTP layer — a private repo created with
    the user's token, then one commit holding pruned/'s files (model, its code, card, tokenizer, the
    sentence-transformers modules); without a token the command refuses before exporting anything; a Hub that fails
    mid-upload is one line, and the export stays on disk."""
    import json

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "e1"), "--push-to-hub", "me/m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Hugging Face token" in err[0] and not (tmp_path / "e1").exists()
    assert not [r for r in fake_hub["requests"] if r[1] != "/api/agent-harnesses"]  # nothing reached the Hub
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "e2"), "--push-to-hub", "me/m",
                 "--private"]) == 0
    create = next(r for r in fake_hub["requests"] if r[1] == "/api/repos/create")
    body = json.loads(create[3])
    assert create[2] == "Bearer hf_test" and (body["organization"], body["name"], body["visibility"]) == ("me", "m", "private")
    (files,) = fake_hub["commits"]
    pruned = tmp_path / "e2" / "pruned"
    assert files == {str(p.relative_to(pruned)) for p in pruned.rglob("*") if p.is_file()}
    assert {"README.md", "config.json", "model.safetensors", "modeling_sparsecse.py", "modules.json"} <= files
    assert "https://huggingface.co/me/m/commit/abc" in capsys.readouterr().out
    card = json.loads(next(r for r in fake_hub["requests"] if r[1] == "/api/validate-yaml")[3])
    assert "pipeline_tag: sentence-similarity" in card["content"] and "library_name: sentence-transformers" in card["content"]
    fake_hub["fail"] = "/commit/main"
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "e4"), "--push-to-hub", "me/m"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("sparsecse:")]
    assert len(err) == 1 and "the upload failed" in err[0] and "403" in err[0]
    assert (tmp_path / "e4" / "pruned" / "config.json").is_file()
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "e3"), "--push-to-hub", "no-owner"]) == 2
