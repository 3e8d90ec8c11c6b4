"""The sweep under Ray on one GPU machine, start to finish, in one short call (issue 40 item 4).

    bash benchmarks/gpu_sweep.sh                      # on the lent GPU: bert-base-shaped encoder, 1 GPU
    python -m benchmarks.gpu_sweep --device cpu --shape tiny --data-dir DIR --out OUT   # what the suite runs

What it does, timing each part:
  1. on a GPU, first `benchmarks.gpu_check` (step time and MFU in fp32, TF32 and bf16; the driver check), bounded
     to 3 minutes, so that its figures come back even if the sweep runs out of time;
  2. `ray start --head` (dashboard off) declaring the machine's GPUs (`--device cuda`) or none (`--device cpu`);
  3. a randomly initialised encoder of `--shape` (no weights to download; bert-base: the paper's base model's shape);
  4. `sparsecse plan` for the config on this GPU type, kept beside what the sweep then measures;
  5. `sparsecse sweep` against that cluster: stage 1 under Ray Train on the GPU, scoring, 4 trials packed two per GPU
     (`sweep.trial_gpus: 0.5`), the driver killed (SIGKILL) once a trial has finished, then `--resume` to the end and
     the export; GPU memory per trial process sampled from nvidia-smi while it runs;
  6. its Ray stopped (its own processes only). Everything lands in OUT/gpu-sweep.json, rewritten after each part (a
     timeout leaves what was done), and the run in OUT/run.
On a CPU (`--device cpu`) the same steps run with trials one CPU each instead of half a GPU: the suite's check that
the script works before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.bench import machine
from benchmarks.gpu_check import random_encoder

HERE = Path(__file__).resolve().parents[1]


def _config(path: Path, model: Path, device: str, steps: int) -> Path:
    gpu = device == "cuda"
    path.write_text(f"""# the GPU sweep (benchmarks/gpu_sweep.py): a random encoder, a short budget, 4 trials
model: {{name: {model}}}
data: {{max_train_sentences: {64 * steps}}}
train: {{batch_size: {64 if gpu else 8}, max_len: 32, lr: 3.0e-5, max_steps: {steps}, eval_steps: {max(2, steps // 4)},
        eval_max_pairs: 200, checkpoint_every: 1}}
score: {{max_pairs: {256 if gpu else 24}, batch_size: {64 if gpu else 8}}}
eval: {{tasks: [STSBenchmark, SICKRelatedness], transfer: none}}
sweep: {{sparsities: [0.0, 0.1, 0.2, 0.3], lams: [0.5], seeds: [1], select: best_dev, select_on: stsb-dev,
         control_seeds: 0, trial_cpus: 1, trial_gpus: {0.5 if gpu else 0}, max_failures: 1}}
ray: {{num_workers: 1, use_gpu: {str(gpu).lower()}, cpus_per_worker: 1, num_cpus: null, wait_for_resources_s: 60}}
""")
    return path


def _gpu_memory(samples: list, stop: threading.Event) -> None:
    """nvidia-smi's per-process GPU memory every 2 s: [time, pid, MiB]."""
    while not stop.wait(2.0):
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return
        for line in out.strip().splitlines():
            pid, mib = (x.strip() for x in line.split(","))
            samples.append([time.time(), int(pid), float(mib)])


def _sweep(argv: list[str], env: dict, log: Path, kill_after_trial: bool) -> dict:
    """One `sparsecse sweep`; with `kill_after_trial`, SIGKILLed as soon as its console shows a finished trial."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sparsecse", "sweep", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        killed = False
        try:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if kill_after_trial and not killed and line.startswith("[trial ") and ": done" in line:
                    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its children, as a lost head node would be
                    killed = True
            rc = proc.wait()
        finally:  # this script stopped (its time limit's SIGTERM): the sweep, in a session of its own, goes too
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return {"rc": rc, "killed": killed, "wall_s": time.time() - t0}


def _save(res: dict, out: Path) -> None:
    """gpu-sweep.json as far as the run has come (rewritten after each part: a timeout still leaves what it had)."""
    tmp = out / "gpu-sweep.json.tmp"
    tmp.write_text(json.dumps(res, indent=2, default=str))
    os.replace(tmp, out / "gpu-sweep.json")


def _gpu_check(out: Path, env: dict, res: dict) -> None:
    """`benchmarks.gpu_check` on the GPU, first (a short, bounded part: its figures come back even if the sweep
    runs out of time)."""
    try:
        check = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cuda", "--out",
                                str(out / "gpu-check.json")], capture_output=True, text=True, env=env, timeout=180)
        res["gpu_check_rc"], res["gpu_check_console"] = check.returncode, (check.stdout + check.stderr)[-4000:]
    except subprocess.TimeoutExpired:
        res["gpu_check_rc"] = "timed out after 180 s"
    res["gpu_check"] = json.loads((out / "gpu-check.json").read_text()) if (out / "gpu-check.json").is_file() else None


def _start_ray(device: str, temp: Path, env: dict) -> str:
    """A head of our own (dashboard off, token auth from `env`) declaring the machine's one GPU or none."""
    import socket

    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    f"--num-gpus={1 if device == 'cuda' else 0}", "--include-dashboard=false", f"--temp-dir={temp}",
                    "--disable-usage-stats"], check=True, capture_output=True, text=True, env=env, timeout=300)
    return f"127.0.0.1:{port}"


def run(device: str, shape: str, data_dir: Path, out: Path, steps: int, gpu: str | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    temp = Path(f"/tmp/ray-gpu-sweep-{os.getpid()}")
    res: dict = {"machine": machine(), "device": device, "shape": shape, "steps": steps, "ray_temp": str(temp)}
    import secrets

    token = out / "ray-auth-token"  # Ray's token authentication, as a cluster of ours runs it
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "SPARSECSE_DASHBOARD": "0", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    if device == "cuda":
        _gpu_check(out, env, res)
        _save(res, out)
    t0 = time.time()
    address = _start_ray(device, temp, env)
    res["ray_start_s"] = time.time() - t0
    stop = threading.Event()
    try:
        model = random_encoder(shape, out / "model")
        cfg = _config(out / "gpu-sweep.yaml", model, device, steps)
        gpu = gpu or gpu_kind()
        plan = subprocess.run([sys.executable, "-m", "sparsecse", "plan", str(cfg), "--data-dir", str(data_dir)]
                              + (["--gpu", gpu, "--gpus", "1"] if device == "cuda" else ["--cpus", str(os.cpu_count())]),
                              capture_output=True, text=True, env=env, timeout=300)
        res["plan_console"] = plan.stdout.splitlines()
        _save(res, out)
        samples: list = []
        sampler = threading.Thread(target=_gpu_memory, args=(samples, stop), daemon=True)
        sampler.start()
        argv = [str(cfg), "--out", str(out / "run"), "--data-dir", str(data_dir), "--address", address, "--yes"]
        res["first"] = _sweep(argv, env, out / "sweep-1.log", kill_after_trial=True)
        res["gpu_memory_mib"] = _per_process(samples)
        _save(res, out)
        res["resumed"] = _sweep(argv + ["--resume"], env, out / "sweep-2.log", kill_after_trial=False)
        res["gpu_memory_mib"] = _per_process(samples)
        run_dir = out / "run"
        for name in ("plan.json", "summary.json"):
            if (run_dir / name).is_file():
                res[name.split(".")[0]] = json.loads((run_dir / name).read_text())
        if (run_dir / "results.json").is_file():  # each trial's own peak (torch's reserved memory), beside nvidia-smi's
            res["trial_gpu_peak_gib"] = {t["trial"]: t.get("gpu_peak_gib") for t in
                                         json.loads((run_dir / "results.json").read_text())["trials"]}
        res["exported"] = (run_dir / "export" / "pruned" / "config.json").is_file()
        res["plan_vs_measured"] = plan_vs_measured(res)
    finally:
        stop.set()
        stop_ray(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
        _save(res, out)
    return res


def plan_vs_measured(res: dict) -> dict:
    """[planned, measured] seconds: stage 1 (the run keeps its time across drivers), the trials and the whole sweep.
    The measured sweep is both drivers' wall time: the kill makes the resumed one redo the trials that were running."""
    plan, timings = res.get("plan") or {}, (res.get("summary") or {}).get("timings") or {}
    waves = -(-plan.get("trials", 0) // max(1, plan.get("concurrency", 1)))
    return {"stage 1": [plan.get("stage1_s"), timings.get("train_s")],
            "trials, after the resume": [waves * plan["trial_s"] if "trial_s" in plan else None, timings.get("tune_s")],
            "sweep, killed and resumed": [plan.get("wall_s"), res.get("first", {}).get("wall_s", 0)
                                          + res.get("resumed", {}).get("wall_s", 0)]}


def gpu_kind() -> str:
    """The plan's name for this machine's GPU (`sparsecse plan --gpu`), from torch's device name; an H100 else."""
    import torch

    name = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else ""
    return next((k for k in ("h200", "h100", "a100", "a10g", "l4") if k in name), "h100")


def ray_processes(marker: str) -> set[int]:
    """The processes of the Ray this script started (their command lines name its temp dir) and their children."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                args = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            table[int(d.name)] = (ppid, args)
    ours = {pid for pid, (_, args) in table.items() if marker in args and pid != os.getpid()}
    while True:
        more = {pid for pid, (ppid, _) in table.items() if ppid in ours} - ours - {os.getpid()}
        if not more:
            return ours
        ours |= more


def stop_ray(marker: str) -> None:
    """SIGKILL this script's Ray only — `ray stop` would also stop any other Ray on the machine."""
    for pid in ray_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _per_process(samples: list) -> dict:
    """The peak GPU memory (MiB) each process held, and how many held some at once."""
    peak: dict = {}
    for _, pid, mib in samples:
        peak[pid] = max(peak.get(pid, 0.0), mib)
    times: dict = {}
    for t, _, _ in samples:
        times[t] = times.get(t, 0) + 1
    return {"peak_per_process": peak, "most_at_once": max(times.values(), default=0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--shape", choices=["bert-base", "tiny"], default="bert-base")
    p.add_argument("--data-dir", default=os.environ.get("SPARSECSE_DATA_DIR", str(HERE / ".carry" / "data")))
    p.add_argument("--out", default="gpu-sweep")
    p.add_argument("--steps", type=int, default=150, help="stage 1's and each trial's optimizer steps")
    p.add_argument("--gpu", help="the GPU type `sparsecse plan` is asked to plan for (default: this machine's)")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: the finally blocks stop Ray, save the JSON
    res = run(a.device, a.shape, Path(a.data_dir), Path(a.out), a.steps, a.gpu)
    ok = res.get("first", {}).get("killed") and res.get("resumed", {}).get("rc") == 0 and res.get("exported")
    print(json.dumps({k: res.get(k) for k in ("first", "resumed", "exported", "gpu_memory_mib", "gpu_check_rc")},
                     default=str))
    return 0 if ok and res.get("gpu_check_rc", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
