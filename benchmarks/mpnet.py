"""`python -m benchmarks.mpnet MODEL_DIR` (after `sparsecse data model all-mpnet-base-v2 --to MODEL_DIR`): one real
model beyond MiniLM, end to end — all-mpnet-base-v2 with mean pooling: STS-B test dense, label-free scores,
masks at 30 % (λ 0.5, no retraining), STS-B test of the masked model, export, the physically pruned model through
sentence-transformers (its embeddings against the masked model's, its STS-B test), and encode speed dense vs
pruned (A/B alternating, median of 3, 512 wiki sentences, batch 64). Prints the BENCHMARKS row; JSON in
bench-results/mpnet.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _speed(fn, sentences, reps: int = 3) -> list[float]:
    return [len(sentences) / _timed(fn, sentences) for _ in range(reps)]


def _timed(fn, sentences) -> float:
    t0 = time.perf_counter()
    fn(sentences)
    return time.perf_counter() - t0


def run(model_dir: str, data_dir: Path, out: Path, sparsity: float = 0.3) -> dict:
    from sentence_transformers import SentenceTransformer

    from sparsecse.method.data import read_lines, unlabeled_pairs
    from sparsecse.method.evaluate import evaluate_sts
    from sparsecse.ops.export import export_model
    from sparsecse.method.model import load_encoder
    from sparsecse.method.prune import encoder_params, select_masks
    from sparsecse.method.score import compute_scores

    enc = load_encoder(model_dir, pooler="avg").eval()
    res = {"model": model_dir, "sparsity": sparsity, "threads": torch.get_num_threads()}
    res["dense_stsb"] = evaluate_sts(enc, data_dir, tasks=("STSBenchmark",), pooler="avg")["STSBenchmark"]
    pairs = unlabeled_pairs(data_dir / "wiki" / "wiki1m_sample.txt", 256, 0)
    t0 = time.perf_counter()
    scores = compute_scores(enc, pairs, batch_size=32, pooler="avg", max_len=32, dropout_views=True)
    res["score_s"] = time.perf_counter() - t0
    hm, nm = select_masks(*scores.importance(0.5), sparsity)
    enc.set_masks(hm, nm)
    res["masked_stsb"] = evaluate_sts(enc, data_dir, tasks=("STSBenchmark",), pooler="avg")["STSBenchmark"]
    res["params_dense"] = sum(p.numel() for p in enc.backbone.parameters())
    res["params_pruned"] = encoder_params(enc)
    export = export_model(enc, out, pooler="avg")
    sentences = [s for s in read_lines(data_dir / "wiki" / "wiki1m_sample.txt") if s.strip()][:512]
    pruned = SentenceTransformer(str(export / "pruned"), device="cpu", trust_remote_code=True)
    dense = SentenceTransformer(model_dir, device="cpu")
    with torch.no_grad():
        batch = enc.tokenize(sentences[:64])
        want = enc(**batch)
    got = torch.as_tensor(pruned.encode(sentences[:64], batch_size=64))
    res["min_cosine_pruned_vs_masked"] = float(torch.nn.functional.cosine_similarity(got, want).min())
    res["pruned_stsb"] = evaluate_sts(load_encoder(str(export / "pruned"), pooler="avg"), data_dir,
                                      tasks=("STSBenchmark",), pooler="avg")["STSBenchmark"]
    encode = {"dense": lambda s: dense.encode(s, batch_size=64), "pruned": lambda s: pruned.encode(s, batch_size=64)}
    for m in encode.values():
        m(sentences[:64])  # warm-up
    speeds = {"dense": [], "pruned": []}
    for _ in range(3):  # A/B alternating
        for name, fn in encode.items():
            speeds[name] += _speed(fn, sentences, reps=1)
    res["sentences_per_s"] = {k: statistics.median(v) for k, v in speeds.items()}
    res["speedup"] = res["sentences_per_s"]["pruned"] / res["sentences_per_s"]["dense"]
    return res


def row(r: dict) -> str:
    return (f"| all-mpnet-base-v2, mean pooling | {r['dense_stsb']:.2f} | {r['masked_stsb']:.2f} | "
            f"{r['pruned_stsb']:.2f} | {r['params_dense'] / 1e6:.1f} M → {r['params_pruned'] / 1e6:.1f} M | "
            f"{r['min_cosine_pruned_vs_masked']:.6f} | {r['sentences_per_s']['dense']:.0f} → "
            f"{r['sentences_per_s']['pruned']:.0f} ({r['speedup']:.2f}×) |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mpnet", description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="bench-results/mpnet-export")
    ap.add_argument("--sparsity", type=float, default=0.3)
    a = ap.parse_args(argv)
    r = run(a.model_dir, Path(a.data_dir), Path(a.out), a.sparsity)
    Path("bench-results").mkdir(exist_ok=True)
    Path("bench-results/mpnet.json").write_text(json.dumps(r, indent=1))
    print(json.dumps(r, indent=1))
    print(row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
