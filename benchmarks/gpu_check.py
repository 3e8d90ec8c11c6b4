"""What to run on a lent GPU machine (issue 24 item 8): no network, no Ray, no data dir needed, a few minutes.

    python -m benchmarks.gpu_check --device cuda [--shape bert-base] [--out gpu-check.json]

Checks (exit 1 if one fails):
  device   a task given a GPU computes on CUDA (`stages.task_device`); on a machine without CUDA it must refuse in
           one line instead of falling back to the CPU
  batches  every rank gets an equal slice of every global batch, last short batches included (world 1–8)
  driver   the GPU computes for torch's CUDA build (`stages.check_gpu`: a matmul; when it fails, a driver older than
           that build needs is named as the cause); on a CPU device it reports what it found
  resume   SimCSE stopped after its first evaluation and resumed from `latest/` continues at that step, on `device`
Measures: the SimCSE step time of a randomly initialised encoder of `--shape` (bert-base: 12 layers × 768, 12 heads,
FFN 3072, the paper's base model) at batch 64 × max_len 32 in fp32 (TF32 off), TF32 and bf16 autocast, with model
GFLOP/s and MFU against the same run's matmul peak. A precision whose step cannot run (a broken CUDA) is a failed
check, not a crash. `--shape tiny` runs the same in seconds on a CPU (what the test suite does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import machine, matmul_peak_gflops, sync, train_flops_per_step
from sparsecse import SparseCSEError

SHAPES = {"bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "intermediate_size": 3072},
          "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}}
WORDS = ("the a man woman dog cat plays runs guitar piano park street red small quickly city river music "
         "old new walks sings").split()


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(5, 24)))) + " ."


CARRIED_TOKENIZER = Path(__file__).resolve().parents[1] / ".carry" / "tokenizer"


def tokenizer_source() -> str:
    """Where the MiniLM tokenizer (BERT's uncased WordPiece) comes from: the packaged model where it is installed,
    else the copy `benchmarks/gpu_prepare.sh` puts in .carry/tokenizer for a GPU machine that lacks the package."""
    from sparsecse.method.model import default_model_path

    try:
        return default_model_path()
    except SparseCSEError:
        if (CARRIED_TOKENIZER / "tokenizer.json").is_file():
            return str(CARRIED_TOKENIZER)
        raise SparseCSEError("no tokenizer for the random encoder: install 'sparsecse[minilm]', or run "
                             "`bash benchmarks/gpu_prepare.sh` here to carry its tokenizer in .carry/tokenizer") from None


def random_encoder(shape: str, where: Path) -> Path:
    """A randomly initialised BERT of `shape` with the MiniLM tokenizer, saved as an HF directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    source = tokenizer_source()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, max_position_embeddings=128, **SHAPES[shape]),
              add_pooling_layer=False).save_pretrained(where)
    AutoTokenizer.from_pretrained(source).save_pretrained(where)
    return where


def synthetic_data(where: Path, n: int = 512) -> Path:
    """A data dir with what training reads: a corpus and STS-B dev pairs (random words, random gold scores)."""
    rng = np.random.default_rng(0)
    (where / "wiki").mkdir(parents=True)
    (where / "wiki" / "wiki1m_sample.txt").write_text("\n".join(_sentence(rng) for _ in range(n)) + "\n")
    dev = where / "senteval" / "STS" / "STSBenchmark" / "sts-dev.csv"
    dev.parent.mkdir(parents=True)
    dev.write_text("".join(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{rng.uniform(0, 5):.3f}\t{_sentence(rng)}\t"
                           f"{_sentence(rng)}\n" for i in range(64)))
    return where


def check_device(device: str) -> str:
    from sparsecse.run.stages import task_device

    if torch.device(device).type == "cuda":
        got = task_device(1)
        assert got == "cuda", got
        return f"a GPU task computes on {got} ({torch.cuda.get_device_name()})"
    try:
        task_device(1)
    except SparseCSEError as e:
        return f"refused without CUDA, in one line: {str(e)[:90]}…"
    raise AssertionError("a task given a GPU without CUDA was not refused")


def check_driver(device: str) -> str:
    from sparsecse.run.stages import check_gpu, driver_version

    if torch.device(device).type != "cuda":
        return (f"no CUDA device asked for (driver {driver_version() or 'not found'}, torch built for CUDA "
                f"{torch.version.cuda or 'none'})")
    problems = check_gpu()
    if problems:
        raise AssertionError(problems[0])
    return f"driver {driver_version()} runs torch's CUDA {torch.version.cuda}"


def check_batches() -> str:
    from sparsecse.method.train import global_batches, rank_slice

    for world in range(1, 9):
        for n in range(world * 2, 200, 7):
            for b in global_batches(n, 64, 2, 0, world):
                sizes = {len(rank_slice(b, r, world)) for r in range(world)}
                assert len(sizes) == 1, (world, n, sizes)
    return "equal slices on every rank, world 1–8"


def check_resume(model: Path, data: Path, device: str, work: Path) -> str:
    from sparsecse.core.config import load_config
    from sparsecse.method.train import Dist, OnReport, train_simcse

    cfg = load_config(None, [f"model.name={model}", "data.train_file=wiki/wiki1m_sample.txt", "train.batch_size=16",
                             "train.max_len=32", "train.max_steps=4", "train.eval_steps=2", "train.eval_max_pairs=64",
                             "train.checkpoint_every=1", "sweep.select_on=stsb-dev"])  # the synthetic dev set

    class Stop(Exception):
        pass

    def stop(rec, ckpt):
        if rec["step"] == 2:
            raise Stop

    try:
        train_simcse(cfg, work / "run", data, dist=Dist(device=device), callbacks=[OnReport(stop)], progress=False)
    except Stop:
        pass
    res = train_simcse(cfg, work / "run", data, dist=Dist(device=device), resume_dir=work / "run" / "latest",
                       progress=False)
    steps = [h["step"] for h in res.history]
    assert steps == [2, 4], steps
    return f"stopped at step 2, resumed there, finished at step {res.steps} on {device}"


def step_time(model: Path, data: Path, device: str, precision: str, steps: int, batch: int = 64,
              max_len: int = 32) -> dict:
    """Median SimCSE step time at `batch` × `max_len` of the encoder at `model`, and its MFU."""
    from sparsecse.method.data import collate
    from sparsecse.method.model import load_encoder
    from sparsecse.method.train import make_optimizer, simcse_loss

    cuda = torch.device(device).type == "cuda"
    if cuda:  # tf32: fp32 tensors, TF32 matmuls; fp32: TF32 off; bf16: autocast (TF32 as the default leaves it)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    enc = load_encoder(str(model), pooler="cls").to(device).train()
    opt = make_optimizer([p for p in enc.parameters() if p.requires_grad], 3e-5, 0.0, device)
    sents = (data / "wiki" / "wiki1m_sample.txt").read_text().splitlines()[:batch]
    tok = enc.tokenizer(sents, truncation=True, max_length=max_len)
    feats = collate([{"input_ids": ids} for ids in tok["input_ids"]], enc.tokenizer.pad_token_id)
    times = []
    for i in range(steps + 1):  # the first is a warm-up
        sync(device)
        t0 = time.perf_counter()
        loss = simcse_loss(enc, feats, 0.05, device, precision="bf16" if precision == "bf16" else "fp32")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    real = int(feats["attention_mask"].sum()) * 2  # both dropout views
    flops = train_flops_per_step(enc.backbone.config, real, feats["input_ids"].shape[1])
    peak = matmul_peak_gflops(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                              n=256 if not cuda else None)  # a tf32 run's peak is measured with TF32 on
    med = statistics.median(times)
    return {"precision": precision, "step_s": med, "model_gflops": flops / med / 1e9, "peak_gflops": peak,
            "mfu": flops / med / 1e9 / peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=list(SHAPES), default="bert-base")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", help="write the figures as JSON here too")
    a = p.parse_args(argv)
    out = {"machine": machine(), "device": a.device, "shape": a.shape, "checks": {}, "steps": []}
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_encoder(a.shape, tmp / "model")
        data = synthetic_data(tmp / "data")
        small = random_encoder("tiny", tmp / "tiny")
        for name, check in (("device", lambda: check_device(a.device)), ("driver", lambda: check_driver(a.device)),
                            ("batches", check_batches), ("resume", lambda: check_resume(small, data, a.device, tmp))):
            try:
                out["checks"][name] = {"ok": True, "detail": check()}
            except Exception as e:  # noqa: BLE001 - every check reports, the script goes on
                failed += 1
                out["checks"][name] = {"ok": False, "detail": f"{type(e).__name__}: {e}"}
            print(f"{name:8s} {'ok  ' if out['checks'][name]['ok'] else 'FAIL'} {out['checks'][name]['detail']}")
        precisions = ("fp32", "tf32", "bf16") if torch.device(a.device).type == "cuda" else ("fp32", "bf16")
        for precision in precisions:
            try:
                r = step_time(model, data, a.device, precision, a.steps)
            except Exception as e:  # noqa: BLE001 - a broken CUDA is a failed check with its reason, not a crash
                failed += 1
                out["steps"].append({"precision": precision, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"step     {precision}: FAIL {out['steps'][-1]['error']}")
                continue
            out["steps"].append(r)
            print(f"step     {a.shape} batch 64 × 32, {precision}: {1000 * r['step_s']:.1f} ms, "
                  f"{r['model_gflops']:.0f} model GFLOP/s, MFU {100 * r['mfu']:.1f} % of a {r['peak_gflops']:.0f} "
                  "GFLOP/s matmul peak")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
