"""The per-node GPU check before stage 1: a node that declares a GPU torch cannot use (here: a Ray node started
with a GPU it does not have, torch a CPU-only wheel), or a driver older than torch's CUDA build needs, is refused
in one line naming the node, the driver and the CUDA build — before any stage runs."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest
import torch

from sparsecse import SparseCSEError
from sparsecse.core.config import load_config
from sparsecse.core.storage import Storage
from sparsecse.run import ray_adapter as ra
from sparsecse.run import stages


def test_driver_versions_are_read_from_the_kernel_modules_version_line(monkeypatch, tmp_path):
    for text, want in [("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023", "535.104.05"),
                       ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build", "580.65.06")]:
        f = tmp_path / "version"
        f.write_text(text)
        real = stages.Path
        monkeypatch.setattr(stages, "Path", lambda p, f=f: f if p == "/proc/driver/nvidia/version" else real(p))
        assert stages.driver_version() == want


def test_a_driver_older_than_torchs_cuda_build_is_named_with_the_version_it_needs(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(stages, "driver_version", lambda: "535.104.05")
    [problem] = stages.check_gpu()
    assert "driver 535.104.05 is older than torch's CUDA 13.0 needs (>= 580.65)" in problem and "\n" not in problem
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # a new enough driver passes on to the device check
    [problem] = stages.check_gpu()
    assert "torch cannot use the GPU" in problem and "driver 535.104.05" in problem and "CUDA 12.4" in problem
    # a GPU that computes is usable whatever the driver's version says (NVIDIA's forward-compatibility libraries)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(stages, "_gpu_matmul", lambda: None)
    assert stages.check_gpu() == []


def _hangs(seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.slow
def test_a_node_that_declares_a_gpu_torch_cannot_use_is_refused_before_stage1(tiny_model_dir, tiny_data_dir, tmp_path):
    import ray

    from sparsecse.run.checks import check_nodes

    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        cfg = load_config(None, [f"model.name={tiny_model_dir}", "sweep.trial_gpus=0.5", "ray.num_cpus=1"])
        run = SimpleNamespace(cfg=cfg, store=Storage(str(tmp_path / "run")), data_dir=str(tiny_data_dir))
        with pytest.raises(SparseCSEError) as e:
            check_nodes(run)
        msg = str(e.value)
        assert msg.startswith("node ") and "GPU: torch cannot use the GPU" in msg and "\n" not in msg
        assert f"torch {torch.__version__} built for CUDA none (a CPU-only wheel)" in msg and "driver " in msg
        assert "CUDA_VISIBLE_DEVICES=0" in msg  # the check held the node's GPU, as a trial would
        # the same cluster with a CPU-only config: the GPU is not checked, the node passes
        check_nodes(SimpleNamespace(cfg=load_config(None, [f"model.name={tiny_model_dir}"]),
                                    store=run.store, data_dir=str(tiny_data_dir)))
        # a check that never answers (a node's storage hanging) is one line once its time is up, not a wait
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
        with pytest.raises(SparseCSEError, match=r"^node check did not finish within 1 s") as e:
            ra.run_on_each_node(_hangs, ra.compute_nodes(), 30, timeout_s=1)
        assert "\n" not in str(e.value)
    finally:
        ray.shutdown()
