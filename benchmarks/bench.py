"""`python -m benchmarks.bench ROW…` (from the repository root, after `pip install -e '.[bench]'`): speed against a peer measured in the same run, A/B alternating, median of N after warm-up.

Rows: train (ours vs sentence-transformers' SimCSE recipe, MNRL on [s, s]), eval (ours vs a straightforward
SentEval-protocol evaluation encoding each subset on its own), inference (physically pruned export vs dense),
sweep (wall time vs the ideal from a finished run). Results: BENCH_DIR/<row>.json (every repetition), and the
row for BENCHMARKS.md printed as markdown.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from sparsecse import SparseCSEError
from sparsecse.core.checkpoints import dir_bytes
from sparsecse.core.io import atomic_write_json
from sparsecse.run.plan import Shape
from sparsecse.run.rundir import TRIAL_EXPERIMENTS


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPU threads, torch {torch.__version__}, {torch.get_num_threads()} torch threads"


def sync(device: str = "cpu") -> None:
    """Wait for queued GPU work, so a timer stops when the work is done (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(n: int | None = None, reps: int = 5, device: str = "cpu", dtype=torch.float32) -> float:
    """Best-of-`reps` square matmul rate: the machine's attainable peak for the arithmetic the model does."""
    n = n or (1024 if torch.device(device).type == "cpu" else 8192)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(ts) / 1e9


def ab(fa, fb, reps: int, warmup: int = 1) -> tuple[list[float], list[float]]:
    """A and B alternating `reps` times after the warm-up; returns the two lists of timings/figures."""
    r = abn({"a": fa, "b": fb}, reps, warmup)
    return r["a"], r["b"]


def abn(arms: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Like `ab` for any number of arms: `warmup` untimed rounds (0 for rows whose single run takes minutes),
    then `reps` rounds running every arm once per round."""
    for _ in range(warmup):
        for f in arms.values():
            f()
    out = {k: [] for k in arms}
    for _ in range(reps):
        for k, f in arms.items():
            out[k].append(f())
    return out


def _sentences(data_dir: Path, n: int) -> list[str]:
    lines = (data_dir / "wiki" / "wiki1m_sample.txt").read_text(encoding="utf-8").splitlines()
    return [s for s in lines if s.strip()][:n]


def fwd_flops(cfg, tokens: int, seq: int) -> float:
    """Matmul FLOPs of the encoder's forward over `tokens` tokens in sequences of length `seq`."""
    shape = Shape(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                  cfg.vocab_size)
    return shape.fwd_flops_per_token(seq) * tokens  # the same count `sparsecse plan` uses


def train_flops_per_step(cfg, batch_tokens: int, seq: int) -> float:
    """Matmul FLOPs of one SimCSE step (forward + backward ≈ 3× forward) over `batch_tokens` tokens."""
    return 3.0 * fwd_flops(cfg, batch_tokens, seq)


def bench_train(data_dir: Path, reps: int, steps: int = 3, batch: int = 64, max_len: int = 32, device: str = "cpu",
                precision: str = "fp32", warmup: int = 1, peak_n: int | None = None) -> dict:
    """Three arms, alternating: ours (train.py's step: padding-free forward, fused AdamW), ours as it was before
    profiling (the backbone's padded forward, foreach AdamW), and the sentence-transformers peer; all on `device`,
    the forward under bf16 autocast when precision="bf16" (the peer's too). `peak_n`: the matmul size of the peak
    measurement (default: matmul_peak_gflops's; a CPU without bf16 units needs seconds per 1024² bf16 matmul)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from sparsecse.method.data import collate
    from sparsecse.method.model import default_model_path, load_encoder
    from sparsecse.method.train import make_optimizer, simcse_loss

    sents = _sentences(data_dir, batch * steps)
    batches = [sents[i * batch:(i + 1) * batch] for i in range(steps)]
    enc = load_encoder("minilm", pooler="cls").to(device).train()
    params = [p for p in enc.parameters() if p.requires_grad]
    opts = {True: make_optimizer(params, 3e-5, 0.0, device), False: torch.optim.AdamW(params, lr=3e-5, foreach=True)}
    bf16 = precision == "bf16"
    dev_type = torch.device(device).type
    toks = [enc.tokenizer(b, truncation=True, max_length=max_len) for b in batches]
    feats = [collate([{"input_ids": ids} for ids in t["input_ids"]], enc.tokenizer.pad_token_id) for t in toks]
    real = sum(int(f["attention_mask"].sum()) * 2 for f in feats)  # real tokens, both views
    slots = sum(f["attention_mask"].numel() * 2 for f in feats)  # padded slots, both views
    seq = max(f["input_ids"].shape[1] for f in feats)

    def ours_arm(packed: bool):
        def run():
            enc.packed = packed
            opt = opts[packed]
            sync(device)
            t0 = time.perf_counter()
            for f in feats:
                loss = simcse_loss(enc, f, 0.05, device, precision=precision)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sync(device)
            return time.perf_counter() - t0
        return run

    tr = Transformer(default_model_path(), max_seq_length=max_len)
    st = SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "cls")], device=device)
    st.train()
    mnrl = MultipleNegativesRankingLoss(st, scale=20.0)  # scale 20 = 1/τ with τ = 0.05
    st_opt = torch.optim.AdamW(st.parameters(), lr=3e-5)
    st_feats = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in st.preprocess(b).items()} for b in batches]

    def peer():
        sync(device)
        t0 = time.perf_counter()
        for f in st_feats:
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
                loss = mnrl([dict(f), dict(f)], None)  # the SimCSE recipe: (s, s) pairs, in-batch negatives
            st_opt.zero_grad(set_to_none=True)
            loss.backward()
            st_opt.step()
        sync(device)
        return time.perf_counter() - t0

    arms = abn({"ours": ours_arm(True), "ours_before": ours_arm(False), "peer": peer}, reps, warmup)
    enc.packed = True
    med = {k: statistics.median(v) for k, v in arms.items()}
    n = batch * steps
    peak = matmul_peak_gflops(peak_n, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    cfg = enc.backbone.config
    model_flops = train_flops_per_step(cfg, real // steps, seq) * steps  # the full encoder on every real token
    padded_flops = train_flops_per_step(cfg, slots // steps, seq) * steps  # what the padded forward computes
    return {"row": "train", "ours_sent_s": n / med["ours"], "before_sent_s": n / med["ours_before"],
            "peer_sent_s": n / med["peer"], "ratio": med["peer"] / med["ours"],
            "ratio_before": med["peer"] / med["ours_before"], "speedup_vs_before": med["ours_before"] / med["ours"],
            "padding_fraction": 1 - real / slots,
            "ours_model_gflops": model_flops / med["ours"] / 1e9,
            "before_executed_gflops": padded_flops / med["ours_before"] / 1e9,
            "peer_executed_gflops": padded_flops / med["peer"] / 1e9,
            "matmul_peak_gflops": peak, "batch": batch, "max_len": max_len, "steps_per_rep": steps,
            "device": device, "precision": precision, "mfu": model_flops / med["ours"] / 1e9 / peak,
            **{f"{k}_s": v for k, v in arms.items()}}


def _senteval_batches(p, size: int = 64) -> list[list[int]]:
    """SentEval's STS batching: pair indices sorted by (len(s1), len(s2), gold) in words, in batches of `size`."""
    order = sorted(range(len(p)), key=lambda i: (len(p.s1[i].split()), len(p.s2[i].split()), p.gold[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def eval_token_work(enc, data_dir: Path, tasks: tuple[str, ...]) -> dict:
    """How much the two eval arms must compute: token slots through the encoder. The peer encodes both sides of
    every pair, padded to the longest in its 64-pair batch; ours encodes each unique sentence once, real tokens
    only. Their ratio bounds the speed-up either arm can get at equal GFLOP/s (attention aside)."""
    from sparsecse.method.data import load_sts_task

    pairs = [p for t in tasks for p in load_sts_task(data_dir, t).values()]
    sents = list(dict.fromkeys(x for p in pairs for x in (*p.s1, *p.s2)))
    cap = min(enc.tokenizer.model_max_length, 512)
    n_tok = [len(ids) for ids in enc.tokenizer(sents, truncation=True, max_length=cap)["input_ids"]]
    lens = dict(zip(sents, n_tok))
    cfg = enc.backbone.config
    peer_slots, peer_flops = 0, 0.0
    for p in pairs:
        for idx in _senteval_batches(p):
            for side in (p.s1, p.s2):
                t = max(lens[side[j]] for j in idx)
                peer_slots += len(idx) * t
                peer_flops += fwd_flops(cfg, len(idx) * t, t)
    ours = sum(n_tok)
    ours_flops = sum(fwd_flops(cfg, t, t) for t in n_tok)  # attention over each sentence's own tokens
    return {"encodes_peer": 2 * sum(len(p) for p in pairs), "encodes_ours": len(sents),
            "token_slots_peer": peer_slots, "tokens_ours": ours, "work_ratio": peer_slots / ours,
            "flops_peer": peer_flops, "flops_ours": ours_flops}


def bench_eval(data_dir: Path, reps: int, tasks: tuple[str, ...], before: bool = False, device: str = "cpu",
               warmup: int = 1, onnx: tuple[str, str] | None = None) -> dict:
    """Ours (every unique sentence once, length-sorted, padding-free forward) vs the SentEval protocol run the
    straightforward way (each subset on its own, the model's own padded forward, as SimCSE's evaluation does);
    `before` adds our evaluator with the padded forward; `onnx` = (export dir, ONNX file) adds our evaluator on
    that ONNX model through ONNX Runtime (`sparsecse eval --backend onnx`; a different model, so its STS figures
    are reported beside the peer's, not compared with them)."""
    from sparsecse.method.data import load_sts_task
    from sparsecse.method.evaluate import aggregate_all, evaluate_sts
    from sparsecse.method.model import load_encoder

    enc = load_encoder("minilm", pooler="avg").to(device).eval()
    res = {}

    def ours_arm(packed: bool, key: str):
        def run():
            enc.packed = packed
            t0 = time.perf_counter()
            res[key] = evaluate_sts(enc, data_dir, tasks=tasks, pooler="avg")
            return time.perf_counter() - t0
        return run

    @torch.no_grad()
    def senteval_style():
        # SentEval: per subset, pairs sorted by (len(s1), len(s2)), batches of 64 pairs, both sides encoded
        enc.packed = False
        t0 = time.perf_counter()
        out = {}
        for t in tasks:
            sys, gold = {}, {}
            for k, p in load_sts_task(data_dir, t).items():
                scores, order = [], []
                for idx in _senteval_batches(p):
                    order += idx
                    t1 = enc.tokenize([p.s1[j] for j in idx])
                    t2 = enc.tokenize([p.s2[j] for j in idx])
                    e1 = enc(**{n: v.to(device) for n, v in t1.items()})
                    e2 = enc(**{n: v.to(device) for n, v in t2.items()})
                    scores.append(torch.nn.functional.cosine_similarity(e1, e2).float().cpu().numpy())
                sys[k] = np.empty(len(order))
                sys[k][order] = np.concatenate(scores)  # back to the file's pair order
                gold[k] = p.gold
            out[t] = 100 * aggregate_all(sys, gold)
        out["avg"] = float(np.mean([out[t] for t in tasks]))
        res["peer"] = out
        return time.perf_counter() - t0

    work = eval_token_work(enc, data_dir, tasks)
    arms = {"ours": ours_arm(True, "ours"), "peer": senteval_style}
    if before:
        arms["ours_before"] = ours_arm(False, "ours_before")
    if onnx:
        from sparsecse.ops.onnx_export import OnnxEncoder

        ort_enc = OnnxEncoder(onnx[0], onnx[1], pooler="avg", threads=torch.get_num_threads())

        def onnx_arm():
            t0 = time.perf_counter()
            res["onnx"] = evaluate_sts(ort_enc, data_dir, tasks=tasks, pooler="avg")
            return time.perf_counter() - t0
        arms["onnx"] = onnx_arm
    t = abn(arms, reps, warmup)
    enc.packed = True
    med = {k: statistics.median(v) for k, v in t.items()}
    diff = max(abs(res[k][task] - res["peer"][task]) for task in tasks for k in res if k not in ("peer", "onnx"))
    return {"row": "eval", "tasks": list(tasks), "device": device, "ours_s": med["ours"], "peer_s": med["peer"],
            "ratio": med["peer"] / med["ours"], "before_s": med.get("ours_before"),
            "speedup_vs_before": med["ours_before"] / med["ours"] if before else None,
            "onnx_s": med.get("onnx"), "onnx_ratio": med["peer"] / med["onnx"] if onnx else None,
            "onnx_model": list(onnx) if onnx else None,
            "max_abs_diff": diff, **work, "ours_model_gflops": work["flops_ours"] / med["ours"] / 1e9,
            "peer_executed_gflops": work["flops_peer"] / med["peer"] / 1e9,
            "matmul_peak_gflops": matmul_peak_gflops(device=device), **{k: v for k, v in res.items()}, **{f"{k}_all": v for k, v in t.items()}}


INFERENCE_ARMS = {"st_dense": "sentence-transformers, dense fp32 (baseline)",
                  "st_pruned": "sentence-transformers on export/pruned", "pruned": "ours, pruned torch",
                  "ort_unfused": "pruned ONNX fp32, torch exporter's graph", "ort_fp32": "pruned ONNX fp32 (fused)",
                  "ort_int8": "pruned ONNX int8 (fused)", "pruned_padded": "ours, pruned torch, padded forward",
                  "st_pruned_padded": "sentence-transformers on export/pruned, its stock (padded) forward",
                  "ort_fp32_padded": "pruned ONNX fp32 (fused, padded)", "ort_int8_padded": "pruned ONNX int8 (fused, padded)"}
SENTENCE_SETS = ("wiki", "stsb-test")


def _sentence_set(data_dir: Path, name: str, n: int) -> list[str]:
    """`n` sentences of the wiki sample, or the first `n` distinct STS-B test sentences (sorted: a fixed set)."""
    if name == "wiki":
        return _sentences(data_dir, n)
    from sparsecse.method.data import load_stsb

    test = load_stsb(data_dir, "test")
    return sorted(set(test.s1) | set(test.s2))[:n]


RANDOM_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "mpnet", "distilbert", "modernbert")


def family_config(family: str, tiny: bool = False):
    """A `family` encoder's config at its public base checkpoint's shape (bert-base-uncased, roberta-base,
    xlm-roberta-base, electra-base-discriminator, mpnet-base, distilbert-base-uncased, ModernBERT-base), or a tiny
    one, with the MiniLM (BERT) vocabulary's special ids so the packaged MiniLM tokenizer serves every family."""
    import transformers as tf

    ids = {"pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}
    if family == "distilbert":
        size = (dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37) if tiny else
                dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072))
        return tf.DistilBertConfig(vocab_size=30522, max_position_embeddings=512, pad_token_id=0, **size)
    size = (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37) if tiny else
            dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072))
    if family == "modernbert":
        size.update({} if tiny else dict(num_hidden_layers=22, intermediate_size=1152))
        return tf.ModernBertConfig(vocab_size=30522, max_position_embeddings=512, global_attn_every_n_layers=3,
                                   local_attention=128, cls_token_id=101, sep_token_id=102, **size, **ids)
    cls = {"bert": tf.BertConfig, "roberta": tf.RobertaConfig, "xlm-roberta": tf.XLMRobertaConfig,
           "electra": tf.ElectraConfig, "mpnet": tf.MPNetConfig}[family]
    extra = {"embedding_size": size["hidden_size"]} if family == "electra" else {}
    vocab = 250002 if family == "xlm-roberta" and not tiny else 30522
    return cls(vocab_size=vocab, max_position_embeddings=514, **extra, **size, **ids)


def random_family_model(spec: str, where: Path) -> Path:
    """`random:FAMILY[:tiny]` (FAMILY one of RANDOM_FAMILIES): that family's encoder with random weights (seed 0)
    and the MiniLM tokenizer, saved as a model directory in `where`. For the inference row's speed on a family whose
    weights this machine cannot download: time depends on the graph's shape, not on the weights' values."""
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.gpu_check import tokenizer_source

    _, family, *rest = spec.split(":")
    if family not in RANDOM_FAMILIES or rest not in ([], ["tiny"]):
        raise SparseCSEError(f"--model {spec}: give random:FAMILY or random:FAMILY:tiny, FAMILY one of "
                             f"{', '.join(RANDOM_FAMILIES)}")
    torch.manual_seed(0)
    AutoModel.from_config(family_config(family, tiny=bool(rest))).save_pretrained(where)
    AutoTokenizer.from_pretrained(tokenizer_source()).save_pretrained(where)
    return where


def bench_inference(data_dir: Path, reps: int, sparsities=(0.1, 0.3, 0.5), n: int = 512, work: Path | None = None,
                    warmup: int = 1, model: str = "minilm", stsb: bool = True, score_pairs: int = 128,
                    pooler: str = "cls_before_pooler", before: bool = False) -> dict:
    """Encode the same `n` sentences (each of SENTENCE_SETS; batch 64, max_len 128, length-sorted batches) with: the
    dense model through sentence-transformers' default torch backend (what a user runs today: the baseline), the
    physically pruned export through sentence-transformers (trust_remote_code) and through our padding-free
    encoder, and the pruned export through ONNX Runtime — the graph torch's exporter writes, the fused graph
    `export --onnx` writes, and its int8 file — each arm's speed-up over the baseline in the same run (best of
    `reps`, arms interleaved). The masks are issue 41's harness: `score --max-pairs 128`, λ 0.5. Beside each: STS-B
    test Spearman × 100, and the ONNX arms' lowest per-sentence cosine to the PyTorch export on the STS-B test
    sentences. `model`/`pooler`: another encoder (a directory, e.g. all-mpnet-base-v2 with `avg`, its mean
    pooling; or `random:FAMILY`, random_family_model's, timed without STS-B: random weights score nothing), every
    arm pooling the same way. `before`: also the pruned export with the family's stock padded forward, under our
    encoder (`pruned_padded`) and under sentence-transformers (`st_pruned_padded`; the export runs padding-free
    there since the twenty-third session), and the fused ONNX graph written padded (`ort_fp32_padded`,
    `ort_int8_padded`), to time the padding-free paths against them."""
    from sentence_transformers import SentenceTransformer

    from sparsecse.method.data import load_stsb
    from sparsecse.method.evaluate import encode, evaluate_sts
    from sparsecse.method.model import load_encoder
    from sparsecse.method.pruned_modeling import load as load_pruned
    from sparsecse.method.prune import masks_for
    from sparsecse.method.score import compute_scores
    from sparsecse.ops.export import export_model
    from sparsecse.ops.onnx_export import INT8_FILE, OnnxEncoder, _torch_export, export_onnx, input_names

    threads = torch.get_num_threads()
    work = work or Path("bench-results") / "inference"
    if model.startswith("random:"):
        stsb, model_dir = False, str(random_family_model(model, work / model.replace(":", "-")))
    else:
        model_dir = model
    dense = load_encoder(model_dir, pooler=pooler).eval()
    # the baseline is the unpruned model as sentence-transformers loads an export (pooling as ours evaluate)
    st = SentenceTransformer(str(export_model(dense, work / "dense", pooler=pooler)), device="cpu")
    st.max_seq_length = 128
    scores = compute_scores(dense, load_stsb(data_dir, "train"), max_pairs=score_pairs)
    sets = {name: _sentence_set(data_dir, name, n) for name in SENTENCE_SETS}
    test = load_stsb(data_dir, "test")
    test_sents = sorted(set(test.s1) | set(test.s2))

    def timed(f):
        def run():
            t0 = time.perf_counter()
            f()
            return time.perf_counter() - t0
        return run

    out = {"row": "inference", "model": model, "pooler": pooler, "n_sentences": n, "threads": threads,
           "score_pairs": score_pairs, "sentence_sets": list(SENTENCE_SETS), "points": []}
    dense_stsb = evaluate_sts(dense, data_dir, tasks=("STSBenchmark",))["STSBenchmark"] if stsb else None
    for s in sparsities:
        enc = load_encoder(model_dir, pooler=pooler)
        enc.set_masks(*masks_for("align_uniform", s, 0.5, 1, scores=scores, pretrained=enc))
        pdir = export_model(enc, work / f"s{int(s * 100)}", pooler=pooler, onnx=True) / "pruned"
        backbone, tok = load_pruned(str(pdir))  # the same export through torch's exporter: what fusing replaces
        _torch_export(backbone.eval(), tok, input_names(tok), pdir / "onnx" / "unfused.onnx")
        st_pruned = SentenceTransformer(str(pdir), device="cpu", trust_remote_code=True)
        st_pruned.max_seq_length = 128
        models = {"pruned": load_encoder(str(pdir), pooler=pooler).eval(),
                  "ort_unfused": OnnxEncoder(pdir, "onnx/unfused.onnx", pooler=pooler, threads=threads),
                  "ort_fp32": OnnxEncoder(pdir, pooler=pooler, threads=threads),
                  "ort_int8": OnnxEncoder(pdir, INT8_FILE, pooler=pooler, threads=threads)}
        st_arms = {"st_pruned": st_pruned}
        if before:
            models["pruned_padded"] = load_encoder(str(pdir), pooler=pooler).eval()
            models["pruned_padded"].packed = False
            padded_dir = work / f"s{int(s * 100)}-padded-onnx"  # the fused graph as it was: padded
            shutil.rmtree(padded_dir, ignore_errors=True)
            shutil.copytree(pdir, padded_dir, ignore=shutil.ignore_patterns("onnx"))
            export_onnx(backbone, tok, padded_dir, padding_free=False)
            models["ort_fp32_padded"] = OnnxEncoder(padded_dir, pooler=pooler, threads=threads)
            models["ort_int8_padded"] = OnnxEncoder(padded_dir, INT8_FILE, pooler=pooler, threads=threads)
            st_arms["st_pruned_padded"] = SentenceTransformer(str(pdir), device="cpu", trust_remote_code=True)
            st_arms["st_pruned_padded"].max_seq_length = 128
            st_arms["st_pruned_padded"][0].auto_model.padding_free = False  # the export's stock forward
        point = {"sparsity": s, "params_pruned": sum(p.numel() for p in models["pruned"].backbone.parameters()),
                 "params_dense": sum(p.numel() for p in dense.backbone.parameters()),
                 "onnx_mb": {f: (pdir / f).stat().st_size / 2 ** 20 for f in ("onnx/model.onnx", INT8_FILE)},
                 "heads_per_layer": backbone.config.heads_per_layer, "sets": {}}
        for name, sents in sets.items():
            arms = {"st_dense": timed(lambda x=sents: st.encode(x, batch_size=64, convert_to_numpy=True))}
            arms.update({k: timed(lambda m=m, x=sents: m.encode(x, batch_size=64, convert_to_numpy=True))
                         for k, m in st_arms.items()})
            arms.update({k: timed(lambda m=m, x=sents: encode(m, x, batch_size=64, max_len=128))
                         for k, m in models.items()})
            t = abn(arms, reps, warmup)
            best = {k: min(v) for k, v in t.items()}
            point["sets"][name] = {"sent_s": {k: len(sents) / v for k, v in best.items()},
                                   "speedup": {k: best["st_dense"] / v for k, v in best.items()}, "times": t}
        if stsb:  # quality: STS-B test
            point["stsb"] = {"st_dense": dense_stsb, **{
                k: evaluate_sts(models[k], data_dir, tasks=("STSBenchmark",))["STSBenchmark"]
                for k in ("pruned", "ort_fp32", "ort_int8")}}
        ref = torch.stack(list(encode(models["pruned"], test_sents).values()))  # each ONNX file against it
        point["min_cosine"] = {k: float(torch.nn.functional.cosine_similarity(
            torch.stack(list(encode(models[k], test_sents).values())), ref).min()) for k in ("ort_fp32", "ort_int8")}
        out["points"].append(point)
    return out


def _transfer_oracle():
    """The one-fit-after-another classifier the batched one is checked against; it lives with the tests."""
    import sys

    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from transfer_oracle import PYTORCH_SEQUENTIAL

    return PYTORCH_SEQUENTIAL


def bench_transfer(data_dir: Path, reps: int, max_examples: int | None, arms: tuple[str, ...],
                   tasks: tuple[str, ...] | None = None) -> dict:
    """The transfer tasks of the packaged MiniLM at SimCSE's protocol: every fit of a task at once (`batched`,
    sparsecse/method/classifier.py) against one fit after another (`sequential`, the tests' oracle), per task, arms alternating; sentences encoded
    once beforehand (timed apart) and shared by the arms; `batched-bf16` runs the batched classifiers on embeddings
    encoded under bf16 autocast (its encoding timed beside fp32's). `max_examples` subsamples each split (the
    sequential arm takes many minutes a task at full size)."""
    from sparsecse.core.config import TRANSFER_TASKS
    from sparsecse.method.evaluate import encode
    from sparsecse.method.model import default_model_path, load_encoder
    from sparsecse.method.transfer import load_tasks, task_sentences, transfer_scores

    sequential = _transfer_oracle()
    enc = load_encoder(default_model_path(), pooler="cls_before_pooler")
    loaded = load_tasks(data_dir, tuple(tasks or TRANSFER_TASKS), max_examples)
    embs, encode_s = {}, {}
    for precision in ("fp32", "bf16") if "batched-bf16" in arms else ("fp32",):
        t0 = time.perf_counter()
        embs[precision] = encode(enc, task_sentences(loaded), batch_size=128, pooler="cls_before_pooler",
                                 precision=precision)
        encode_s[precision] = time.perf_counter() - t0
    names = {"batched": ("pytorch", "fp32"), "sequential": (sequential, "fp32"),
             "batched-bf16": ("pytorch", "bf16")}
    rows, scores = {}, {a: {} for a in arms}
    for t, task in loaded.items():
        def arm(a, t=t, task=task):
            def run():
                t1 = time.perf_counter()
                scores[a].update(transfer_scores({t: task}, embs[names[a][1]], classifier=names[a][0]))
                return time.perf_counter() - t1
            return run
        times = abn({a: arm(a) for a in arms}, reps, warmup=0)
        rows[t] = {a: statistics.median(v) for a, v in times.items()}
    total = {a: sum(r[a] for r in rows.values()) for a in arms}
    return {"row": "transfer", "warmup": 0, "max_examples": max_examples, "encode_s": encode_s, "tasks": rows,
            "total": total,
            "scores": {a: {t: v for t, v in sc.items() if t != "avg"} for a, sc in scores.items()},
            "ratio": total["sequential"] / total["batched"] if {"batched", "sequential"} <= set(arms) else None}


def list_schedule(durations: list[float], slots: int) -> float:
    """Makespan of running `durations` in the given order on `slots` slots, each job on the first free slot, no gaps."""
    free = [0.0] * max(1, slots)
    for d in durations:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += d
    return max(free)


def _trial_records(run: Path) -> list[dict]:
    """Every trial of a finished sweep (tune/ and, for sweep.search=optuna, tune-control/), each as its last
    record: the end time, the trial's own time, steps trained, best dev so far, whether it was evaluated on test."""
    from sparsecse.core.results import DEV, TrialResult

    out = []
    for p in sorted(p for sub in TRIAL_EXPERIMENTS for p in (run / sub).rglob("result.json")):
        rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        if rows:
            last = rows[-1]
            trial = TrialResult.from_record({"config": last.get("config") or last, "metrics": last})
            out.append({"end": last["timestamp"], "s": last["time_total_s"], "steps": last.get("step", 0),
                        "dev": last.get(DEV, float("nan")), "trial": trial.point.name, "evaluated": trial.evaluated})
    return sorted(out, key=lambda t: t["end"])


def _finished(run: Path, flag: str = "--run") -> tuple[dict, dict]:
    """(summary.json, sweep.json) of a finished sweep, else a one-line error."""
    if not (run / "summary.json").is_file() or not (run / "sweep.json").is_file():
        raise SparseCSEError(f"{flag} {run}: not a finished sweep (summary.json/sweep.json missing); point it at the "
                             "--out directory of a completed `sparsecse sweep`")
    return json.loads((run / "summary.json").read_text()), json.loads((run / "sweep.json").read_text())


def bench_sweep(run: Path) -> dict:
    """Overhead of a finished sweep's stage 3 (the Tune trials), from its own records.

    ideal_s = Σ trial time ÷ concurrency (the issue's definition; it counts a half-empty last round as overhead);
    schedule_s = the makespan of the same trials, in the order they started, on `concurrency` slots with no gaps —
    the best any scheduler could do with the grid as given. overhead = wall ÷ ideal − 1; ray_overhead =
    wall ÷ schedule − 1 isolates what Ray/Tune themselves cost (process start, reporting, checkpoint syncing)."""
    summary, state = _finished(run)
    cfg = state["config"]
    # (start, duration) of every stage-3 trial, the s = 0 controls of a sweep.search=optuna run included
    trials = [(t["end"] - t["s"], t["s"]) for t in _trial_records(run)]
    if not trials:
        raise SparseCSEError(f"--run {run}: no trial results under tune/; point --run at a finished sweep directory")
    trials.sort()
    times = [d for _, d in trials]
    conc = cfg["sweep"]["max_concurrent_trials"] or max(1, int(os.cpu_count() // cfg["sweep"]["trial_cpus"]))
    slots = min(conc, len(times))
    ideal = sum(times) / slots
    schedule = list_schedule(times, slots)
    wall = summary["timings"]["tune_s"]
    return {"row": "sweep", "trials": len(times), "concurrency": conc, "sum_trial_s": sum(times), "ideal_s": ideal,
            "schedule_s": schedule, "tune_wall_s": wall, "overhead": wall / ideal - 1,
            "packing_overhead": schedule / ideal - 1, "ray_overhead": wall / schedule - 1,
            "stage_runs": summary["stage_runs"], "timings": summary["timings"]}


def bench_search(grid_run: Path, other_run: Path, within: float = 0.1) -> dict:
    """Grid vs a search (sweep.search=optuna, ± ASHA) on the same budgets, from the two finished sweeps' records:
    each one's trials, CPU-seconds (Σ trial time × trial_cpus) and training steps in all; for the search also what
    it had spent, in the order trials finished, when a trial first reached a dev within `within` of the grid's
    best dev (the grid needs all its trials to know its best); and the point each selected."""
    arms = {}
    for key, run in (("grid", grid_run), ("search", other_run)):
        cfg = _finished(run, "--run" if key == "grid" else "--against")[1]["config"]
        trials = _trial_records(run)
        if not trials:
            raise SparseCSEError(f"{run}: no trial results under tune/; point it at a finished sweep directory")
        cpus = cfg["sweep"]["trial_cpus"]
        sel = json.loads((run / "summary.json").read_text())["selected"] or {}
        arms[key] = {"run": str(run), "search": cfg["sweep"].get("search", "grid"), "scheduler": cfg["sweep"]["scheduler"],
                     "trials": len(trials), "stopped": sum(not t["evaluated"] for t in trials),
                     "cpu_s": cpus * sum(t["s"] for t in trials), "steps": sum(t["steps"] for t in trials),
                     "selected": {k: sel.get(k) for k in ("sparsity", "lam", "dev_mean")}, "_trials": trials,
                     "_cpus": cpus}
    target = max(t["dev"] for t in arms["grid"]["_trials"] if t["evaluated"]) - within
    for a in arms.values():
        spent, hit = 0.0, None
        for i, t in enumerate(a["_trials"], 1):
            spent += a["_cpus"] * t["s"]
            if t["dev"] >= target:
                hit = {"trials": i, "cpu_s": spent}
                break
        a["reached"] = hit
        del a["_trials"], a["_cpus"]
    g, o = arms["grid"], arms["search"]
    same = (o["selected"]["dev_mean"] is not None and g["selected"]["dev_mean"] is not None
            and o["selected"]["dev_mean"] >= g["selected"]["dev_mean"] - within)
    return {"row": "search", "within": within, "grid_best_dev": target + within, **arms,
            "compute_ratio": o["cpu_s"] / g["cpu_s"], "steps_ratio": o["steps"] / g["steps"],
            "reach_ratio": (o["reached"]["cpu_s"] / g["cpu_s"]) if o["reached"] else None, "same_choice": same}


CHECKPOINT_PARTS = ("model", "best", "trainer_state", "other")


def _checkpoint_bytes(ckpt: Path) -> dict[str, int]:
    """Bytes of one kept Tune checkpoint by part (model/, best/, trainer_state.pt, the rest); a file hard-linked
    twice counts once."""
    parts, seen = dict.fromkeys(CHECKPOINT_PARTS, 0), set()
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        st = f.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        top = f.relative_to(ckpt).parts[0]
        key = "trainer_state" if top == "trainer_state.pt" else top if top in ("model", "best") else "other"
        parts[key] += st.st_size
    return parts


def bench_storage(run: Path, against: Path) -> dict:
    """What a sweep's trial checkpoints occupy in its storage, this run (`run`) against another (`against`, e.g. the
    same config swept by an older version): per trial, the checkpoints Tune kept and their bytes by part, the best
    models kept beside them (models/trials/) counted as best/."""
    arms = {}
    for key, d in (("run", run), ("against", against)):
        trials = sorted(t for sub in TRIAL_EXPERIMENTS for t in (d / sub).glob("*/") if (t / "result.json").is_file())
        if not (d / "summary.json").is_file() or not trials:
            raise SparseCSEError(f"--run/--against {d}: not a finished sweep with trials (summary.json or tune/*/ "
                                 "missing); point both at the --out directories of completed `sparsecse sweep`s")
        per = []
        for t in trials:
            ckpts = [_checkpoint_bytes(c) for c in sorted(t.glob("checkpoint_*")) if c.is_dir()]
            each = [sum(c.values()) for c in ckpts]
            per.append({"trial": t.name, "checkpoints": len(ckpts), "bytes": sum(each), "each": each,
                        "parts": {k: sum(c[k] for c in ckpts) for k in CHECKPOINT_PARTS}})
        # the trials' best models, kept beside their checkpoints since train.checkpoint_every (checkpoints.py)
        models = dir_bytes(d / "models" / "trials") if (d / "models" / "trials").is_dir() else 0
        total = sum(t["bytes"] for t in per) + models
        if not total:
            raise SparseCSEError(f"--run/--against {d}: its trials keep no checkpoint files (deleted after the sweep?); "
                                 "compare sweeps whose tune/*/checkpoint_* are still there")
        arms[key] = {"dir": str(d), "trials": len(per), "bytes": total, "per_trial": total / len(per),
                     "checkpoints": sum(t["checkpoints"] for t in per), "detail": per,
                     "parts": {k: sum(t["parts"][k] for t in per) + (models if k == "best" else 0)
                               for k in CHECKPOINT_PARTS}}
    return {"row": "storage", **arms, "ratio": arms["run"]["per_trial"] / arms["against"]["per_trial"]}


def bench_checkpoints(run: Path, against: Path) -> dict:
    """What checkpointing cost each trial of two finished sweeps (e.g. the default train.checkpoint_every against
    checkpoint_every=1, a checkpoint at every evaluation): bytes handed to storage and seconds spent on it, as the
    trials measured them (results.json), against the trial's wall time."""
    arms = {}
    for key, d, flag in (("run", run, "--run"), ("against", against, "--against")):
        cfg = _finished(d, flag)[1]["config"]["train"]
        rows = [t for t in json.loads((d / "results.json").read_text())["trials"] if t.get("checkpoint_bytes") is not None]
        if not rows:
            raise SparseCSEError(f"{flag} {d}: its trials did not record their checkpoint uploads (a sweep from before "
                                 "train.checkpoint_every); compare sweeps run by this version")
        n = len(rows)
        arms[key] = {"dir": str(d), "trials": n, "every": cfg.get("checkpoint_every"),
                     "evaluations": sum(-(-t["steps"] // cfg["eval_steps"]) for t in rows) / n,
                     "checkpoints": sum(t["checkpoints"] for t in rows) / n,
                     "bytes": sum(t["checkpoint_bytes"] for t in rows) / n,
                     "seconds": sum(t["checkpoint_s"] for t in rows) / n, "trial_s": sum(t["trial_s"] for t in rows) / n}
        arms[key]["share"] = arms[key]["seconds"] / arms[key]["trial_s"]
    return {"row": "checkpoints", **arms, "bytes_ratio": arms["run"]["bytes"] / arms["against"]["bytes"]}


def bench_plan(run: Path) -> dict:
    """`sparsecse plan`'s prediction (plan.json, written before the sweep started) against the sweep's measured
    times, stage by stage."""
    summary, _ = _finished(run)
    if not (run / "plan.json").is_file():
        raise SparseCSEError(f"--run {run}: no plan.json (a sweep from before `sparsecse plan`); run the sweep again")
    plan, t = json.loads((run / "plan.json").read_text()), summary["timings"]
    waves = -(-plan["trials"] // plan["concurrency"])
    stages = {"stage 1": (plan["stage1_s"], t.get("train_s")), "scoring": (plan["score_s"], t.get("score_s")),
              "trials": (waves * plan["trial_s"], t.get("tune_s")),
              "evaluation and export": (plan["after_s"], t.get("evaluate_export_s")),
              "whole sweep": (plan["wall_s"], t.get("total_s"))}
    return {"row": "plan", "run": str(run), "hardware": plan["hardware"], "trials": plan["trials"],
            "stages": {k: {"planned_s": p, "measured_s": m, "ratio": p / m if m else None} for k, (p, m) in stages.items()}}


SWEEP_ROWS = ("sweep", "search", "storage", "checkpoints", "plan")  # rows read from finished sweeps' records


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def markdown(r: dict) -> str:
    """The row for BENCHMARKS.md: command, machine and date, then the figures of both arms."""
    timing = "read from the finished sweeps' records" if r["row"] in SWEEP_ROWS else \
        f"{'best' if r['row'] == 'inference' else 'median'} of {r['reps']} after {r['warmup']} warm-up"
    head = [f"`{r['command']}`" if r.get("command") else "", f"{r['machine']}, {r['date']}, {timing}", ""]
    if r["row"] == "train":
        rows = ["| sent/s: ours | ours before | peer | ours ÷ peer | model GFLOP/s | matmul peak | MFU |",
                "|---:|---:|---:|---:|---:|---:|---:|",
                f"| {r['ours_sent_s']:.1f} | {r['before_sent_s']:.1f} | {r['peer_sent_s']:.1f} | {r['ratio']:.2f}× | "
                f"{r['ours_model_gflops']:.1f} | {r['matmul_peak_gflops']:.1f} | {_pct(r['mfu'])} |"]
    elif r["row"] == "eval":
        before = f"{r['before_s']:.1f} s" if r.get("before_s") else "—"
        rows = ["| tasks | ours | ours before | peer | peer ÷ ours | work ratio | ours GFLOP/s | peak | max Δ |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                f"| {' '.join(r['tasks'])} | {r['ours_s']:.1f} s | {before} | {r['peer_s']:.1f} s | {r['ratio']:.2f}× | "
                f"{r['work_ratio']:.2f}× | {r['ours_model_gflops']:.1f} | {r['matmul_peak_gflops']:.1f} | "
                f"{r['max_abs_diff']:.1e} |"]
        if r.get("onnx_s"):
            rows += ["", f"ONNX Runtime, `{r['onnx_model'][1]}` of {r['onnx_model'][0]} (mean pooling): "
                     f"{r['onnx_s']:.1f} s, **{r['onnx_ratio']:.2f}×** the peer; STS "
                     + ", ".join(f"{t} {r['onnx'][t]:.2f} (peer, dense: {r['peer'][t]:.2f})" for t in [*r['tasks'], 'avg'])]
    elif r["row"] == "inference":
        arms = [k for k in INFERENCE_ARMS if k in r["points"][0]["sets"][SENTENCE_SETS[0]]["sent_s"]]
        rows = ["| sparsity | sentences | params pruned / dense | " + " | ".join(INFERENCE_ARMS[k] for k in arms) + " |",
                "|---:|---|---:|" + "---:|" * len(arms)]
        for p in r["points"]:
            for name, v in p["sets"].items():
                rows.append(f"| {_pct(p['sparsity'])} | {name} | {p['params_pruned'] / 1e6:.1f} M / "
                            f"{p['params_dense'] / 1e6:.1f} M | "
                            + " | ".join(f"{v['sent_s'][k]:.0f} ({v['speedup'][k]:.2f}×)" for k in arms) + " |")
        rows.append("\nsentences/s (× the sentence-transformers dense baseline in the same run, best of the reps); "
                    f"model {r.get('model', 'minilm')}, pooling {r.get('pooler', 'cls_before_pooler')}")
        stsb = all("stsb" in p for p in r["points"])
        rows += ["", "| sparsity |" + (" STS-B test: dense / pruned torch / ONNX fp32 / ONNX int8 |" if stsb else "")
                 + " min cosine to the torch export, fp32 / int8 |", "|---:|" + ("---|" if stsb else "") + "---|"]
        rows += [f"| {_pct(p['sparsity'])} |" + (f" {p['stsb']['st_dense']:.2f} / {p['stsb']['pruned']:.2f} / "
                 f"{p['stsb']['ort_fp32']:.2f} / {p['stsb']['ort_int8']:.2f} |" if stsb else "")
                 + f" {p['min_cosine']['ort_fp32']:.5f} / {p['min_cosine']['ort_int8']:.4f} |" for p in r["points"]]
    elif r["row"] == "search":
        def line(name, a):
            reach = (f"{a['reached']['trials']} / {a['reached']['cpu_s']:.0f} s" if a["reached"] else "never")
            sel = a["selected"]
            return (f"| {name} | {a['trials']} ({a['stopped']} stopped) | {a['cpu_s']:.0f} s | {a['steps']} | {reach} | "
                    f"{sel['sparsity']:.2%}, λ={sel['lam']:.2f} | {sel['dev_mean']:.2f} |")
        rows = [f"| sweep | trials | CPU-seconds | training steps | trials / CPU-s to dev ≥ grid best − {r['within']} "
                "| selected | its dev |", "|---|---:|---:|---:|---:|---|---:|",
                line(f"grid ({r['grid']['run']})", r["grid"]),
                line(f"{r['search']['search']} + {r['search']['scheduler']} ({r['search']['run']})", r["search"]), "",
                f"Search ÷ grid: **{_pct(r['compute_ratio'])} of the CPU-seconds**, {_pct(r['steps_ratio'])} of the "
                f"training steps" + (f"; it reached the grid's best − {r['within']} after {_pct(r['reach_ratio'])} of the "
                                     "grid's compute" if r["reach_ratio"] is not None else "; it never came within "
                                     f"{r['within']} of the grid's best dev") + ". Same choice (selected dev within "
                f"{r['within']} of the grid's selection): **{'yes' if r['same_choice'] else 'no'}**."]
    elif r["row"] == "checkpoints":
        def line(name, a):
            return (f"| {name} ({a['dir']}) | {a['every']} | {a['trials']} | {a['evaluations']:.1f} | {a['checkpoints']:.1f} | "
                    f"{a['bytes'] / 1e6:.0f} MB | {a['seconds']:.2f} s | {a['trial_s']:.1f} s | {_pct(a['share'])} |")
        rows = ["| sweep | checkpoint_every | trials | evaluations / trial | checkpoints / trial | uploaded / trial | "
                "checkpoint time / trial | trial wall | share of the trial |", "|---|---|---:|---:|---:|---:|---:|---:|---:|",
                line("run", r["run"]), line("against", r["against"]), "",
                f"Bytes uploaded per trial, run ÷ against: **{r['bytes_ratio']:.2f}×**."]
    elif r["row"] == "plan":
        rows = ["| stage | planned | measured | planned ÷ measured |", "|---|---:|---:|---:|"]
        rows += [f"| {k} | {v['planned_s']:.0f} s | {v['measured_s']:.0f} s | {v['ratio']:.2f} |"
                 for k, v in r["stages"].items() if v["measured_s"]]
        rows += ["", f"Planned on: {r['hardware']}; {r['trials']} trials ({r['run']})."]
    elif r["row"] == "transfer":
        arms = list(r["total"])
        rows = ["| task | " + " | ".join(f"{a} (s)" for a in arms) + " | " + " | ".join(f"{a} acc" for a in arms) + " |",
                "|---|" + "---:|" * (2 * len(arms))]
        for t, v in r["tasks"].items():
            rows.append(f"| {t} | " + " | ".join(f"{v[a]:.1f}" for a in arms) + " | "
                        + " | ".join(f"{r['scores'][a].get(t, float('nan')):.2f}" for a in arms) + " |")
        rows.append(f"| all {len(r['tasks'])} | " + " | ".join(f"**{r['total'][a]:.1f}**" for a in arms) + " |"
                    + " |" * len(arms))
        enc = r["encode_s"] if isinstance(r["encode_s"], dict) else {"fp32": r["encode_s"]}
        rows += ["", "Encoding (once, shared by the arms): " + ", ".join(f"{p} {v:.1f} s" for p, v in enc.items())
                 + f"; examples per split: {r['max_examples'] or 'all'}."
                 + (f" Sequential ÷ batched: **{r['ratio']:.1f}×**." if r["ratio"] else "")]
    elif r["row"] == "storage":
        def mb(x):
            return f"{x / 1e6:.0f} MB"

        def line(name, a):
            p = a["parts"]
            return (f"| {name} ({a['dir']}) | {a['trials']} | {a['checkpoints']} | {mb(a['per_trial'])} | {mb(a['bytes'])} | "
                    f"{mb(p['model'])} / {mb(p['best'])} / {mb(p['trainer_state'])} / {mb(p['other'])} |")
        rows = ["| sweep | trials | kept checkpoints | per trial | all trials | model / best / trainer state / rest |",
                "|---|---:|---:|---:|---:|---|", line("run", r["run"]), line("against", r["against"]), "",
                f"Trial storage, run ÷ against: **{r['ratio']:.2f}×** per trial."]
    else:
        rows = ["| trials | stage-3 wall | Σ trial time | ideal | gap-free schedule | overhead | packing | Ray/Tune | "
                "stage-1 / scoring runs |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                f"| {r['trials']} | {r['tune_wall_s']:.1f} s | {r['sum_trial_s']:.1f} s | {r['ideal_s']:.1f} s | "
                f"{r['schedule_s']:.1f} s | {_pct(r['overhead'])} | {_pct(r['packing_overhead'])} | "
                f"{_pct(r['ray_overhead'])} | {r['stage_runs']['train']} / {r['stage_runs']['score']} |"]
    return "\n".join(head + rows)


def build_parser():
    import argparse

    from sparsecse.core.config import STS_TASKS

    b = argparse.ArgumentParser(prog="python -m benchmarks.bench",
                                description="benchmarks against peers measured in the same run (BENCHMARKS.md rows)")
    b.add_argument("which", nargs="+", choices=["train", "eval", "inference", "transfer", *SWEEP_ROWS, "all"])
    b.add_argument("--max-examples", type=int, help="transfer row: subsample each split to this many examples")
    b.add_argument("--arms", nargs="+", choices=["batched", "sequential", "batched-bf16"],
                   default=["batched", "sequential"],
                   help="transfer row: which classifier paths to time (batched-bf16: on embeddings encoded under bf16 "
                        "autocast)")
    b.add_argument("--transfer-tasks", nargs="+", help="transfer row: these tasks only (default: all seven)")
    b.add_argument("--data-dir")
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--warmup", type=int, default=1, help="untimed runs of each arm first (eval, train, inference rows)")
    b.add_argument("--out", default="bench-results")
    b.add_argument("--threads", type=int)
    b.add_argument("--tasks", nargs="+", default=list(STS_TASKS), help="STS tasks for the eval row")
    b.add_argument("--run", default="runs/quickstart", help="finished sweep directory for the sweep row (search row: "
                   "the grid sweep)")
    b.add_argument("--against", help="search row: the finished sweep with sweep.search=optuna to compare with --run; "
                   "storage and checkpoints rows: the finished sweep --run is compared with")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="train and eval rows: where to run")
    b.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="train row: the forward under bf16 autocast (ours and the peer)")
    b.add_argument("--onnx-model", nargs=2, metavar=("DIR", "FILE"),
                   help="eval row: also our evaluator on this ONNX export file through ONNX Runtime")
    b.add_argument("--model", default="minilm",
                   help="inference row: the encoder (a model directory or name; default the packaged MiniLM; "
                   f"random:FAMILY, FAMILY one of {', '.join(RANDOM_FAMILIES)}: that family's base shape with random "
                   "weights, timed without STS-B)")
    b.add_argument("--pooler", default="cls_before_pooler", choices=["cls_before_pooler", "cls", "avg"],
                   help="inference row: pooling for every arm (avg: mean pooling, as all-mpnet-base-v2 was trained)")
    b.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.3, 0.5],
                   help="inference row: the sparsities to prune, export and time")
    b.add_argument("--n-sentences", type=int, default=512, help="inference row: sentences per set and arm")
    b.add_argument("--before", action="store_true",
                   help="eval and inference rows: also time our encoder with the padded forward (eval: before/after "
                        "profiling; inference: the pruned export, against the padding-free forward)")
    return b


def run_bench(a, argv: list[str]) -> None:
    import shlex

    from sparsecse.method.data import resolve_data_dir

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SparseCSEError("--device cuda: no CUDA GPU is visible to torch here; drop --device or run on a GPU "
                             "machine with a CUDA build of torch")
    if a.precision == "bf16" and a.device == "cpu" and not getattr(torch.backends.cpu, "get_cpu_capability",
                                                                   lambda: "")().startswith("AVX512"):
        print("bench: note: bf16 on a CPU without AVX-512/AMX runs emulated and slower than fp32")
    if a.threads:
        torch.set_num_threads(a.threads)
    which = {"train", "eval", "inference", "sweep"} if "all" in a.which else set(a.which)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if "search" in which and not a.against:
        raise SparseCSEError("search row: --against DIR (the sweep.search=optuna run to compare with the grid --run) "
                             "is required")
    for row in ("storage", "checkpoints"):
        if row in which and not a.against:
            raise SparseCSEError(f"{row} row: --against DIR (the finished sweep to compare --run's trial {row} with) "
                                 "is required")
    data_dir = resolve_data_dir(a.data_dir) if which - set(SWEEP_ROWS) else None
    header = {"date": str(date.today()), "machine": machine(), "reps": a.reps, "warmup": a.warmup,
              "command": "python -m benchmarks.bench " + shlex.join(argv)}
    for row in ("train", "eval", "inference", "transfer", *SWEEP_ROWS):
        if row not in which:
            continue
        if row == "train":
            r = bench_train(data_dir, a.reps, device=a.device, precision=a.precision, warmup=a.warmup)
        elif row == "eval":
            r = bench_eval(data_dir, a.reps, tuple(a.tasks), before=a.before, device=a.device, warmup=a.warmup,
                           onnx=tuple(a.onnx_model) if a.onnx_model else None)
        elif row == "inference":
            r = bench_inference(data_dir, a.reps, tuple(a.sparsities), a.n_sentences, work=out / "inference",
                                warmup=a.warmup, model=a.model, pooler=a.pooler, before=a.before)
        elif row == "transfer":
            r = bench_transfer(data_dir, a.reps, a.max_examples, tuple(a.arms), a.transfer_tasks)
        elif row == "sweep":
            r = bench_sweep(Path(a.run))
        elif row == "search":
            r = bench_search(Path(a.run), Path(a.against))
        elif row == "storage":
            r = bench_storage(Path(a.run), Path(a.against))
        elif row == "checkpoints":
            r = bench_checkpoints(Path(a.run), Path(a.against))
        else:
            r = bench_plan(Path(a.run))
        r = {**header, **r}  # a row that sets its own warm-up (transfer: none, each run takes minutes) keeps it
        atomic_write_json(out / f"{row}.json", r)
        print(markdown(r))
        print(f"(every repetition: {out / (row + '.json')})\n")


def main(argv: list[str] | None = None) -> int:
    """Bad input is one line on stderr and exit 2, as in the `sparsecse` CLI."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    try:
        run_bench(a, argv)
    except SparseCSEError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
