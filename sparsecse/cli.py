"""`sparsecse` command line: sweep, plan, show, the method one step at a time (train, eval, score, prune, pilot,
export), k8s-submit and data (fetch, stage, model).

Every user error is one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
from pathlib import Path

from .core.config import POOLERS, SCORERS, STS_TASKS, TRANSFER_TASKS, ScoreConfig, TrainConfig
from .core.outputs import claim
from . import RunFailed, SparseCSEError, __version__


def _tasks(spec: list[str] | None) -> tuple[list[str], list[str]]:
    names = []
    for s in spec or ["sts"]:
        names += [t for t in s.split(",") if t]
    sts, transfer = [], []
    for t in names:
        if t == "sts":
            sts += list(STS_TASKS)
        elif t == "transfer":
            transfer += list(TRANSFER_TASKS)
        elif t == "all":
            sts += list(STS_TASKS)
            transfer += list(TRANSFER_TASKS)
        elif t in STS_TASKS:
            sts.append(t)
        elif t in TRANSFER_TASKS:
            transfer.append(t)
        else:
            raise SparseCSEError(f"--tasks: unknown task {t!r}; use sts, transfer, all or one of "
                                 f"{', '.join(STS_TASKS + TRANSFER_TASKS)}")
    return list(dict.fromkeys(sts)), list(dict.fromkeys(transfer))


class _Parser(argparse.ArgumentParser):
    """argparse with sparsecse's error shape: one line on stderr, exit 2 (no usage block)."""

    def error(self, message: str):
        where = f"{self.prog.split(' ', 1)[1]}: " if " " in self.prog else ""
        self.exit(2, f"sparsecse: error: {_one_line(where + message)}; see `{self.prog} --help`\n")


def _path(text: str) -> str:
    """An argparse type: a path or URI that is not empty (an empty --out would silently mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; pass a directory path or a storage URI")
    if "://" not in text and Path(text.rstrip("/")).expanduser().is_symlink():
        return str(Path(text).expanduser().resolve())  # a link: the folder it names (never the link renamed away)
    return text


def _count(minimum: int):
    """An argparse type: an integer ≥ `minimum` (batch sizes, threads, lengths), else a one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def cmd_train(a) -> int:
    from .core.config import load_config
    from .method.data import resolve_data_dir
    from .method.train import train_simcse

    cfg = load_config(a.config, a.set)
    data_dir = resolve_data_dir(a.data_dir or cfg.data.dir)
    out = claim(a.out, "train", overwrite=a.overwrite)
    res = train_simcse(cfg, out, data_dir, tb_dir=out / "tensorboard")
    print(f"trained {res.steps} steps; best STS-B dev {res.best_dev:.2f} -> {res.best_dir}")
    return 0


def cmd_eval(a) -> int:
    import numpy as np

    from .method.data import resolve_data_dir
    from .method.evaluate import evaluate_sts
    from .core.tables import task_table
    from .core.io import atomic_write_json
    from .method.model import load_encoder

    _threads(a.threads)
    sts, transfer = _tasks(a.tasks)
    data_dir = resolve_data_dir(a.data_dir)
    if a.json:
        claim(a.json, "results", overwrite=a.overwrite, flag="--json")
    if a.backend == "onnx":
        from .ops.onnx_export import OnnxEncoder

        if a.precision != "fp32":
            raise SparseCSEError("--precision bf16 runs the torch backend under autocast; an ONNX model keeps the "
                                 "precision it was exported at (drop --precision, or use --backend torch)")
        enc = OnnxEncoder(a.model, a.file, pooler=a.pooler, threads=a.threads)
    else:
        enc = load_encoder(a.model, pooler=a.pooler)
    results: dict[str, float] = {}
    if sts:
        r = evaluate_sts(enc, data_dir, tasks=tuple(sts), batch_size=a.batch_size, pooler=a.pooler, progress=True,
                         precision=a.precision)
        print(task_table(r, sts, title=f"{a.model} ({a.pooler or enc.pooler})"))
        results.update({t: r[t] for t in sts})
        results["avg"] = r["avg"]
    if transfer:
        from .method.transfer import evaluate_transfer

        tr = evaluate_transfer(enc, data_dir, tasks=tuple(transfer), pooler=a.pooler, progress=True,
                               classifier=a.transfer_classifier, precision=a.precision)
        print(task_table(tr, transfer))
        results.update({k: v for k, v in tr.items()})
        if not sts:
            results["avg"] = float(np.mean([tr[t] for t in transfer]))
        else:
            results["transfer_avg"] = tr["avg"]
    if a.json:
        atomic_write_json(a.json, results)
    return 0


def cmd_score(a) -> int:
    from .core.config import load_config
    from .method.data import resolve_data_dir
    from .method.model import load_encoder
    from .method.score import save_scores, score_importance

    _threads(a.threads)
    data_dir = resolve_data_dir(a.data_dir)
    claim(a.out, "scores", overwrite=a.overwrite)
    enc = load_encoder(a.model)
    pooler = a.pooler or enc.meta.get("eval_pooler", "cls_before_pooler")
    sets = [f"score.source={a.source}", f"score.split={a.split}", f"score.seed={a.seed}",
            f"score.batch_size={a.batch_size}", f"score.positive_threshold={a.threshold}",
            f"score.positive_rule={a.positive_rule}", f"train.max_len={a.max_len}", f"model.eval_pooler={pooler}",
            *([f"score.max_pairs={a.max_pairs}"] if a.max_pairs else [])]
    cfg = load_config(None, sets)
    if a.train_file:  # a path is not YAML-safe as a --set value: set it on the typed config
        import dataclasses

        cfg = cfg.replace(data=dataclasses.replace(cfg.data, train_file=a.train_file))
    scores, _ = score_importance(enc, cfg, data_dir, progress=True)  # what the sweep's scoring stage runs
    save_scores(scores, a.out)
    print(f"scored {scores.meta['num_batches']} batches ({a.source}) -> {a.out}")
    return 0


def cmd_prune(a) -> int:
    from .core.config import load_config
    from .method.data import resolve_data_dir
    from .method.model import load_encoder, weights_fingerprint
    from .method.prune import check_compatible, masks_for, rewind
    from .method.score import load_scores

    if not 0.0 <= a.sparsity < 1.0:
        raise SparseCSEError(f"--sparsity {a.sparsity}: must be in [0, 1) (the fraction of heads/neurons removed)")
    if not 0.0 <= a.lam <= 1.0:
        raise SparseCSEError(f"--lam {a.lam}: must be in [0, 1]")
    cfg = load_config(a.config, a.set)
    combine, normalize = cfg.score.single("combine", "sparsecse prune"), cfg.score.single("normalize", "sparsecse prune")
    out = claim(a.out, "prune", overwrite=a.overwrite)
    expect = weights_fingerprint(load_encoder(a.trained)) if a.trained else None
    scores = load_scores(a.scores, expect_fingerprint=expect)
    pre = load_encoder(a.pretrained, pooler=cfg.model.pooler, dropout=cfg.train.dropout)
    check_compatible(scores.meta, pre, a.scores)
    init_fp = scores.meta.get("init_fingerprint")
    if init_fp and init_fp != weights_fingerprint(pre):
        raise SparseCSEError(f"{a.scores}: scores come from a model trained from a different pre-trained checkpoint "
                             f"than --pretrained {a.pretrained}; rewind to the checkpoint training started from")
    # the masks a sweep's trial at this point trains with (stages.trial), rewound to the pre-trained weights
    enc = rewind(pre, *masks_for("align_uniform", a.sparsity, a.lam, cfg.train.seed, scores=scores, pretrained=pre,
                                 combine=combine, normalize=normalize))
    meta = {"sparsity": a.sparsity, "lam": a.lam, "combine": combine, "normalize": normalize,
            "pretrained": a.pretrained, "scores": str(a.scores),
            "scores_fingerprint": scores.meta.get("model_fingerprint"), "eval_pooler": cfg.model.eval_pooler}
    if a.retrain:
        from .method.train import train_simcse

        data_dir = resolve_data_dir(a.data_dir or cfg.data.dir)
        res = train_simcse(cfg, out, data_dir, init=enc, meta=meta, tb_dir=out / "tensorboard")
        print(f"rewound + retrained {res.steps} steps at sparsity {a.sparsity}, λ={a.lam}; "
              f"best STS-B dev {res.best_dev:.2f} -> {res.best_dir}")
    else:
        from .method.model import save_encoder

        save_encoder(enc, out / "masked", meta)
        print(f"masked (rewound, not retrained) model -> {out / 'masked'}")
    return 0


def cmd_export(a) -> int:
    if a.push_to_hub:  # a missing token or a malformed repo is refused before anything is exported
        from .ops.hub import check_push

        check_push(a.push_to_hub)
    out = _export(a)
    if a.push_to_hub:
        from .ops.hub import push_to_hub

        print(f"pushed {out / 'pruned'} -> {push_to_hub(out / 'pruned', a.push_to_hub, a.private)}")
    return 0


def _export(a) -> Path:
    """The export `sparsecse export` asks for: from a sweep's run, a training/prune directory or a model."""
    from .method.data import resolve_data_dir
    from .ops.export import export_from_run, export_model, is_run

    data_dir = resolve_data_dir(a.data_dir) if a.data_dir else None
    claim(a.out, "export", overwrite=a.overwrite)
    results = _results_file(a.results) if a.results else None
    if is_run(a.source):  # a sweep's run, local or s3://…: its export, copied (or built from the selected trial)
        out = export_from_run(a.source, a.out, pooler=a.pooler, onnx=a.onnx, quantize=a.quantize == "int8",
                              data_dir=data_dir)
        print(f"exported {a.source} -> {out} (dense) and {out / 'pruned'} (physically pruned)"
              + (f", ONNX -> {out / 'pruned' / 'onnx'}" if a.onnx else ""))
        return Path(out)
    src = Path(a.source)
    for sub in ("best", "masked"):  # a training/trial directory, or what `sparsecse prune` wrote
        if (src / sub).is_dir():
            src = src / sub
            break
    out = export_model(str(src), a.out, pooler=a.pooler, results=results, onnx=a.onnx, quantize=a.quantize == "int8",
                       data_dir=data_dir)
    print(f"exported dense -> {out}, physically pruned -> {out / 'pruned'}"
          + (f", ONNX -> {out / 'pruned' / 'onnx'}" if a.onnx else ""))
    return Path(out)


def _results_file(path: str) -> dict:
    """--results: a JSON object of evaluation results (e.g. `sparsecse eval --json`) for the model card."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SparseCSEError(f"--results {path}: file not found; pass the JSON `sparsecse eval --json` wrote") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SparseCSEError(f"--results {path}: not a JSON file ({str(e).splitlines()[0][:120]}); pass the JSON "
                             "`sparsecse eval --json` wrote") from None
    if not isinstance(data, dict):
        raise SparseCSEError(f"--results {path}: must be a JSON object of task: score")
    return data


def cmd_sweep(a) -> int:
    from .run.sweep import run_sweep

    if a.resume and a.resume_if_exists:
        raise SparseCSEError("--resume and --resume-if-exists: pass one (--resume-if-exists also starts a new sweep)")
    resume = "auto" if a.resume_if_exists else a.resume
    if a.check:
        from .run.checks import check_run

        print(check_run(a.config, a.set, resume, a.out, a.data_dir, confirmed=a.yes))
        return 0
    run_sweep(a.config, overrides=a.set, resume=resume, address=a.address, out=a.out, data_dir=a.data_dir,
              confirmed=a.yes, max_hours=a.max_hours, verbose=a.verbose, exits_on_interrupt=True)
    return 0


def cmd_stage(a) -> int:
    from .core.staging import stage

    out = stage(a.to, Path(a.data_dir).expanduser() if a.data_dir else None, a.model)
    print("[stage] point the config at the staged copies: " + " ".join(f"--set {k}={v}" for k, v in out.items()))
    return 0


def cmd_k8s_submit(a) -> int:
    from .ops.k8s import submit

    print(submit(a.file, a.namespace, a.timeout_s, a.kubectl))
    return 0


def cmd_split_model(a) -> int:
    from .ops.split_models import fetch_model

    print(f"[model] {a.name} -> {fetch_model(a.name, a.to)}")
    return 0


def cmd_plan(a) -> int:
    from dataclasses import asdict

    from .core.config import load_config
    from .method.data import default_data_dir
    from .run.plan import make_plan, render

    from .core.staging import is_staged_uri

    cfg = load_config(a.config, a.set)
    given = a.data_dir or cfg.data.dir
    data = None if is_staged_uri(given) else default_data_dir(given)  # staged: known corpus sizes, no download
    p = make_plan(cfg, data if data and data.is_dir() else None, a.gpu, a.gpus, a.cpus)
    print(json.dumps(asdict(p), indent=1) if a.json else render(p))
    return 0


def cmd_show(a) -> int:
    from .run.show import show

    print(show(a.run, trials=a.trials, as_json=a.json))
    return 0


def cmd_fetch(a) -> int:
    from .core.fetch import DEFAULT_BASE_URL, fetch

    from .method.data import default_data_dir

    data_dir = default_data_dir(a.data_dir)
    for p in fetch(data_dir, base_url=a.base_url or DEFAULT_BASE_URL, progress=not a.quiet):
        print(f"ok {p}")
    return 0


def cmd_pilot(a) -> int:
    from .method.data import resolve_data_dir
    from .core.io import atomic_write_bytes, atomic_write_json
    from .study import figures
    from .method.model import load_encoder, weights_fingerprint
    from .study.pilot import pilot, sparsities_with_zero
    from .method.prune import check_compatible
    from .method.score import load_scores

    _threads(a.threads)
    for s in a.sparsities:
        if not 0.0 <= s < 1.0:
            raise SparseCSEError(f"--sparsities {s}: must be in [0, 1) (the fraction of heads/neurons removed)")
    data_dir = resolve_data_dir(a.data_dir)
    if a.out:
        claim(a.out, "pilot", overwrite=a.overwrite)
    enc = load_encoder(a.model, pooler=a.pooler)
    # the pilot prunes the very model the scores were computed on: same shape is not enough, same weights
    scores = load_scores(a.scores, expect_fingerprint=weights_fingerprint(enc))
    check_compatible(scores.meta, enc, a.scores)
    tasks = a.tasks or list(STS_TASKS)
    simcse = None
    if "simcse" in a.scorers:  # SimCSE's own InfoNCE Taylor score, on unlabeled sentences
        from .core.config import DataConfig
        from .method.data import train_path, unlabeled_pairs
        from .method.score import compute_infonce_scores

        sents = unlabeled_pairs(train_path(DataConfig.train_file, data_dir), 1024, a.seed).s1
        simcse = compute_infonce_scores(enc, sents, max_len=TrainConfig.max_len, pooler="cls")
    rows = pilot(enc.eval(), scores, data_dir, sparsities_with_zero(a.sparsities), lam=a.lam, scorers=a.scorers,
                 readings=ScoreConfig(combine=tuple(dict.fromkeys(a.combine)),
                                      normalize=tuple(dict.fromkeys(a.normalize))).allocations,
                 seed=a.seed, simcse_scores=simcse, sts={"tasks": tuple(tasks), "pooler": a.pooler})
    from .study.report import pilot_table

    md, png = pilot_table(rows, tasks), figures.png(figures.pilot(rows))
    print(md)
    if a.out:
        out = Path(a.out)
        atomic_write_json(out / "pilot.json", {"model": a.model, "scores": a.scores, "lam": a.lam, "rows": rows})
        atomic_write_bytes(out / "pilot.png", png)
        print(f"-> {out / 'pilot.json'}, {out / 'pilot.png'}")
    return 0


DESCRIPTION = ("SparseCSE: sparse contrastive learning of sentence embeddings as a Ray sweep — find the sparsity that "
               "keeps a sentence encoder's quality, and export the smaller model. Start with `sparsecse sweep`; "
               "`sparsecse plan` says what a sweep costs first.")

# Help for the options several commands share, and for the ones without their own (a test checks every argument
# has help and every command an example).
SHARED_HELP = {
    "--config": "a sweep YAML (sweeps/*.yaml); its train/model/data sections apply",
    "--set": "override one config field, KEY=VALUE in YAML (e.g. --set train.lr=1e-4 --set 'sweep.lams=[0.5]'); "
             "repeatable",
    "--out": "where to write (a new path, or sparsecse's own earlier output with --overwrite)",
    "--data-dir": "the SentEval-layout data dir (default: $SPARSECSE_DATA_DIR, else ~/.cache/sparsecse/data)",
    "--model": "a model: a directory, a hub name, or minilm (the packaged all-MiniLM-L6-v2)",
    "--pooler": "cls (CLS + SimCSE's MLP), cls_before_pooler (CLS, SimCSE's evaluation), avg (mean over tokens)",
    "--batch-size": "sentences per forward pass",
    "--threads": "torch CPU threads (default: torch's)",
    "--scores": "a scores.parquet from `sparsecse score` (or a sweep's run)",
    "--sparsity": "the fraction of heads and of FFN neurons to mask, in [0, 1)",
    "--lam": "λ of L_score = λ·L_align + (1−λ)·L_uniform, in [0, 1]",
    "--address": "a running Ray cluster (ray://host:10001 or host:6379; default: $RAY_ADDRESS, else a local Ray)",
    "config": "the sweep YAML, e.g. sweeps/quickstart.yaml",
}
COMMAND_HELP = {
    ("score", "--max-pairs"): "read at most this many STS pairs (default: all of the split)",
    ("score", "--split"): "the STS-B split scored on (train: the paper's; test is refused by the sweep's checks)",
    ("score", "--seed"): "the pair order's seed",
    ("prune", "--pretrained"): "the pre-trained model to mask and rewind to (the one stage 1 started from)",
    ("prune", "--retrain"): "retrain SimCSE with the mask fixed (--config's train section), else save the masked "
                            "model as is",
    ("pilot", "--sparsities"): "the sparsities to prune at",
    ("pilot", "--tasks"): "STS test tasks (default: all seven)",
    ("k8s-submit", "--namespace"): "the Kubernetes namespace (default: kubectl's current)",
    ("data fetch", "--base-url"): "a mirror of the SentEval bundle and wiki1m (default: SimCSE's download locations)",
    ("data fetch", "--quiet"): "no progress bars",
    ("data fetch", "--data-dir"): "where to put the data (default: $SPARSECSE_DATA_DIR, else ~/.cache/sparsecse/data)",
}
EXAMPLES = {
    "train": "sparsecse train --config sweeps/quickstart.yaml --out runs/simcse",
    "eval": "sparsecse eval --model runs/quickstart/export --tasks sts transfer --json eval.json",
    "score": "sparsecse score --model runs/simcse/best --out scores.parquet   # --source stsb: the paper's labelled pairs",
    "prune": ("sparsecse prune --pretrained minilm --scores scores.parquet --sparsity 0.1 --lam 0.5 "
              "--out runs/p10 --retrain --config sweeps/quickstart.yaml"),
    "pilot": "sparsecse pilot --model runs/simcse/best --scores scores.parquet --out runs/pilot",
    "export": "sparsecse export runs/quickstart --out my-model --onnx",
    "sweep": ("sparsecse sweep sweeps/quickstart.yaml\n  sparsecse sweep sweeps/paper-bert-base.yaml "
              "--out s3://bucket/run --address ray://head:10001"),
    "plan": "sparsecse plan sweeps/paper-bert-base.yaml --gpu a100 --gpus 8",
    "show": "sparsecse show runs/quickstart --trials",
    "k8s-submit": "sparsecse k8s-submit cluster/rayjob.yaml -n sparsecse",
    "data": "sparsecse data fetch",
    "data fetch": "sparsecse data fetch --data-dir ~/data/senteval",
    "data stage": "sparsecse data stage --to s3://bucket/staged --data-dir ~/.cache/sparsecse/data "
                  "--model bert-base-uncased@main",
    "data model": "sparsecse data model all-mpnet-base-v2 --to models/mpnet",
}


def _sentence(text: str) -> str:
    """A command's one-line help as its description: first letter up, the rest as written (STS stays STS)."""
    return (text[:1].upper() + text[1:] + ".") if text else ""


def _document(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Every command's description and example, every argument's help (from the tables above where the command
    gives none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sp in action.choices.items():
                cmd = f"{path} {name}".strip()
                sp.description = sp.description or _sentence(helps.get(name, ""))
                sp.epilog = f"example:\n  {EXAMPLES[cmd]}" if cmd in EXAMPLES else sp.epilog
                sp.formatter_class = argparse.RawDescriptionHelpFormatter
                _document(sp, cmd)
        elif not action.help and not isinstance(action, argparse._HelpAction):
            key = (action.option_strings or [action.dest])[0]
            action.help = COMMAND_HELP.get((path, key)) or SHARED_HELP.get(key)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sparsecse", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"sparsecse {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    poolers = list(POOLERS)

    _model_commands(sub, poolers)
    _study_commands(sub, poolers)
    _run_commands(sub)
    _document(p)
    return p


def _overwrite(parser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an earlier {what} of sparsecse's at the output path (anything else there is "
                             "refused, never deleted)")


def _model_commands(sub, poolers) -> None:
    """train, eval, score, prune: one step of the method each."""
    t = sub.add_parser("train", help="train unsupervised SimCSE")
    t.add_argument("--config", required=True)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", required=True, type=_path)
    _overwrite(t, "training run")
    t.add_argument("--data-dir")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate an encoder on STS (and transfer) tasks")
    e.add_argument("--model", required=True)
    e.add_argument("--pooler", choices=poolers)
    e.add_argument("--tasks", nargs="+", help="sts (default), transfer, all, or task names")
    e.add_argument("--transfer-classifier", choices=["pytorch", "sklearn"], default="pytorch",
                   help="pytorch: SimCSE's protocol (SentEval usepytorch, Adam + early stopping), every fit of a task "
                        "at once; sklearn: SentEval's "
                        "scikit-learn logistic regression")
    e.add_argument("--data-dir")
    e.add_argument("--json", help="write the scores to this JSON file")
    _overwrite(e, "results file (--json)")
    e.add_argument("--batch-size", type=_count(1), default=128)
    e.add_argument("--threads", type=_count(1))
    e.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: run an ONNX export (--file) with ONNX Runtime, same protocol")
    e.add_argument("--file", default="onnx/model.onnx", help="with --backend onnx: the ONNX file inside --model")
    e.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: encode under bfloat16 autocast (GPUs; CPUs with AMX/AVX-512-bf16): faster, figures "
                        "not SentEval's to the digit (BENCHMARKS 11); fp32 (default): the protocol")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("score", help="alignment/uniformity importance gradients of heads and neurons")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True, type=_path)
    _overwrite(s, "scores file")
    s.add_argument("--data-dir")
    s.add_argument("--batch-size", type=_count(2), default=64)
    s.add_argument("--source", choices=["unlabeled", "stsb"], default=ScoreConfig.source,
                   help="unlabeled (default, as the sweep scores): sentences of the corpus, each with its second "
                        "dropout view, no labels; stsb: STS-B --split pairs, positives by gold label (the paper's)")
    s.add_argument("--train-file", help="with --source unlabeled: the corpus, relative to --data-dir (default: "
                                        "data.train_file, the wiki sample)")
    s.add_argument("--max-pairs", type=_count(2), help="sentences (unlabeled; default 1024) or STS-B pairs (stsb; "
                                                       "default all of the split) to read")
    s.add_argument("--split", default="train", choices=["train", "dev", "test"])
    s.add_argument("--pooler", choices=poolers)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-len", type=_count(2), default=TrainConfig.max_len,
                   help="truncate as training and the sweep's scoring do (train.max_len; default %(default)s)")
    s.add_argument("--threshold", type=float, default=ScoreConfig.positive_threshold,
                   help="STS-B gold above this makes a pair positive for L_align (score.positive_threshold)")
    s.add_argument("--positive-rule", choices=["gt", "ge"], default=ScoreConfig.positive_rule,
                   help="gt: gold > threshold (SimCSE §5, default); ge: gold >= threshold (score.positive_rule)")
    s.add_argument("--threads", type=_count(1))
    s.set_defaults(fn=cmd_score)

    r = sub.add_parser("prune", help="select masks at a sparsity, rewind, optionally retrain")
    r.add_argument("--pretrained", required=True)
    r.add_argument("--scores", required=True)
    r.add_argument("--sparsity", type=float, required=True)
    r.add_argument("--lam", type=float, required=True)
    r.add_argument("--out", required=True, type=_path)
    _overwrite(r, "pruned model")
    r.add_argument("--retrain", action="store_true")
    r.add_argument("--trained", help="the scored model, to verify the scores' fingerprint")
    r.add_argument("--config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--data-dir")
    r.set_defaults(fn=cmd_prune)


def _study_commands(sub, poolers) -> None:
    """pilot, export."""
    q = sub.add_parser("pilot", help="pilot study: prune a trained model at each sparsity, no retraining, STS")
    q.add_argument("--model", required=True, help="the trained model the scores were computed on")
    q.add_argument("--scores", required=True)
    q.add_argument("--sparsities", type=float, nargs="+", default=[0.02, 0.1, 0.2, 0.3, 0.5])
    q.add_argument("--lam", type=float, default=0.5)
    q.add_argument("--scorers", nargs="+", choices=list(SCORERS), default=["align_uniform", "random", "magnitude"],
                   help="simcse (SimCSE's own InfoNCE Taylor score) is computed here on data.train_file sentences")
    q.add_argument("--combine", nargs="+", choices=["gradient", "score"], default=["gradient"],
                   help="how λ combines the two objectives; several values: one curve each")
    q.add_argument("--normalize", nargs="+", choices=["none", "layer"], default=["none"],
                   help="none: rank raw scores across layers; layer: normalise each layer first; several: one curve each")
    q.add_argument("--tasks", nargs="+", choices=list(STS_TASKS))
    q.add_argument("--pooler", choices=poolers, default="cls_before_pooler")
    q.add_argument("--seed", type=int, default=0, help="the random scorer's draw")
    q.add_argument("--out", type=_path, help="directory for pilot.json and pilot.png")
    _overwrite(q, "pilot study")
    q.add_argument("--data-dir")
    q.add_argument("--threads", type=_count(1))
    q.set_defaults(fn=cmd_pilot)

    x = sub.add_parser("export", help="export dense + physically pruned checkpoints")
    x.add_argument("source", help="a sweep's run (local path or s3://… URI), a training/prune directory or a model")
    x.add_argument("--out", required=True, type=_path)
    _overwrite(x, "export")
    x.add_argument("--pooler", choices=poolers)
    x.add_argument("--results", help="JSON of evaluation results for the model card")
    x.add_argument("--onnx", action="store_true", help="also pruned/onnx/model.onnx for ONNX Runtime ([onnx] extra)")
    x.add_argument("--quantize", choices=["int8", "none"], default="int8",
                   help="with --onnx: int8 also writes pruned/onnx/model_qint8.onnx (default)")
    x.add_argument("--data-dir", help="with --onnx: measure each ONNX file's STS-B test and speed for the model card")
    x.add_argument("--push-to-hub", metavar="OWNER/NAME",
                   help="then upload the physically pruned model (OUT/pruned, its card included) to this Hugging Face "
                        "model repo (needs a token: `hf auth login` or HF_TOKEN)")
    x.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    x.set_defaults(fn=cmd_export)


def _run_commands(sub) -> None:
    """sweep, data fetch."""
    w = sub.add_parser("sweep", help="the whole SparseCSE study on Ray")
    w.add_argument("config")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    w.add_argument("--resume", action="store_true", help="continue the sweep at --out (finished work is kept)")
    w.add_argument("--resume-if-exists", action="store_true",
                   help="continue the sweep at --out if there is one, else start it (for retried cluster jobs)")
    w.add_argument("--address")
    w.add_argument("--out", type=_path,
                   help="run directory or storage URI, e.g. s3://bucket/run (default runs/<config name>)")
    w.add_argument("--data-dir")
    w.add_argument("--check", action="store_true",
                   help="check the config, data, model and --out as the sweep would (exit 2 on an error), start "
                        "nothing and leave nothing behind")
    w.add_argument("--yes", action="store_true",
                   help="run a sweep past the sanity limits (more than 20 replicates or 2,000 trials, or a plan "
                        "longer than --max-hours)")
    w.add_argument("-v", "--verbose", action="store_true",
                   help="also stream Ray's, Tune's and the workers' own output (by default they go to RUN/logs/ and "
                        "Ray's log files; the console shows the plan, the stages, one line per trial and the answer)")
    w.add_argument("--max-hours", type=float, metavar="H",
                   help="refuse (exit 2) when the printed plan's wall time exceeds H hours, unless --yes")
    w.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("plan", help="what a sweep config will cost: trials, steps, GPU-hours, wall time, bytes")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpu", choices=["cpu", "h100", "h200", "a100", "a10g", "l4"], default="cpu",
                   help="the hardware to plan for (default cpu: this machine's cores, its matmul peak measured now)")
    p.add_argument("--gpus", type=_count(1), help="GPUs in the cluster (default: ray.num_workers when ray.use_gpu)")
    p.add_argument("--cpus", type=_count(1), help="CPU cores for a CPU plan (default: ray.num_cpus, else this machine's)")
    p.add_argument("--data-dir", help="where the corpus is counted (default: data.dir, SPARSECSE_DATA_DIR, the cache)")
    p.add_argument("--json", action="store_true", help="the figures as JSON")
    p.set_defaults(fn=cmd_plan)

    v = sub.add_parser("show", help="a finished run's answer again (the choice, its evidence, the model and how to "
                                     "load it), or how far a live one has come")
    v.add_argument("run", help="the sweep's --out: a run directory or a storage URI")
    v.add_argument("--trials", action="store_true", help="also every trial: status, sparsity, λ, seed, scores")
    v.add_argument("--json", action="store_true", help="the run's summary.json as stored")
    v.set_defaults(fn=cmd_show)

    k = sub.add_parser("k8s-submit", help="check the sweep in the Kubernetes cluster, then apply the RayJob (KubeRay)")
    k.add_argument("file", help="the RayJob file, e.g. cluster/rayjob.yaml")
    k.add_argument("--namespace", "-n")
    k.add_argument("--timeout-s", type=float, default=900.0, help="how long the check may take (default 900)")
    k.add_argument("--kubectl", default="kubectl", help="the kubectl to run (default: kubectl on PATH)")
    k.set_defaults(fn=cmd_k8s_submit)

    d = sub.add_parser("data", help="data management")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    f = dsub.add_parser("fetch", help="download the SentEval bundle and wiki1m")
    f.add_argument("--data-dir")
    f.add_argument("--base-url")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(fn=cmd_fetch)
    g = dsub.add_parser("stage", help="copy the data dir and a pinned model snapshot into storage, with checksums")
    g.add_argument("--to", required=True, type=_path, help="storage URI (or path) to stage under, e.g. s3://bucket/staged")
    g.add_argument("--data-dir", help="the data dir to stage (after `sparsecse data fetch`)")
    g.add_argument("--model", help="NAME@REVISION of a hub model (or a local directory) to stage")
    g.set_defaults(fn=cmd_stage)
    m = dsub.add_parser("model", help="assemble a model published on the package registry as a split zip")
    m.add_argument("name", help="all-mpnet-base-v2")
    m.add_argument("--to", required=True, type=_path, help="a new directory for the model")
    m.set_defaults(fn=cmd_split_model)


def _one_line(text: str) -> str:
    """An error as one line whatever it quotes: a line break or control character the user typed is shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SparseCSEError as e:
        print(f"sparsecse: error: {_one_line(str(e))}", file=sys.stderr)
        return 1 if isinstance(e, RunFailed) else 2
    except KeyboardInterrupt as e:
        print(f"sparsecse: {e}" if str(e) else "sparsecse: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise  # anything else is a bug of ours: its traceback is what a report needs
        # the output, not the temp file beside it that would have been renamed into place (io.atomic_write_bytes)
        where = re.sub(r"/[.]([^/]+)[.][A-Za-z0-9_]+[.]tmp$", r"/\1", str(e.filename)) + ": " if e.filename else ""
        print(f"sparsecse: error: {_one_line(where)}{e.strerror}; choose a location you can write (or free space) "
              "and rerun — what was already written is kept", file=sys.stderr)
        return 2


def entry() -> None:
    """The `sparsecse` command: main(), then exit — at once when a storage probe was abandoned still waiting (a
    cloud SDK's exit hooks would wait for it too, and the one-line error would be followed by a hang), and after
    Ctrl-C (the resume line is the last word: interpreter teardown with Ray's threads still unwinding can crash in
    C++ and turn exit 130 into 1; what the run wrote is already in place, as after a kill)."""
    import os

    from .core.storage import abandoned_probes

    code = main()
    if abandoned_probes() or code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
