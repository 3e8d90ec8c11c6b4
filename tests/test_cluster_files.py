"""The cluster files a user copies on day one, checked without a cloud: `ray up`'s schema, KubeRay's RayJob fields,
and the image they both run."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"

# Variables that exist where these commands run (on the node / in the container), not only on the user's machine.
REMOTE_VARS = {"HOME", "RAY_HEAD_IP", "EFS_DNS"}


def _gpu_cluster() -> dict:
    return yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())


def _rayjob() -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()))
    return next(d for d in docs if d["kind"] == "RayJob"), {d["kind"]: d for d in docs}


def _image() -> str:
    m = re.search(r"^#\s+docker push (\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert m, "the Dockerfile documents its push command"
    return m.group(1)


def test_gpu_cluster_validates_against_rays_schema_and_has_no_local_only_variables():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = _gpu_cluster()
    jsonschema.validate(cfg, schema)
    cmds = [c for k in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                        "head_start_ray_commands", "worker_start_ray_commands") for c in cfg.get(k, [])]
    for c in cmds:
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", c))
        assert used <= REMOTE_VARS, (c, used - REMOTE_VARS)
        assert "bashrc" not in c and "RAY_AUTH_TOKEN=" not in c  # no secret in an rc file or a command line
    # the token travels as a file and every `ray start` reads it from there
    token_remote = next(k for k, v in cfg["file_mounts"].items() if v.endswith(".ray/auth_token"))
    starts = [c for c in cmds if "ray start" in c]
    assert len(starts) == 2
    for c in starts:
        assert "RAY_AUTH_MODE=token" in c and f"RAY_AUTH_TOKEN_PATH={token_remote.replace('~', '$HOME')}" in c
    head = next(c for c in starts if "--head" in c)
    assert "--num-cpus=0" in head and "--dashboard-host=127.0.0.1" in head
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert cfg["docker"]["image"] == _image()
    # the NFS alternative really mounts what the container sees
    assert any("mount -t nfs4" in c and "/mnt/efs" in c for c in cfg["initialization_commands"])
    assert "-v /mnt/efs:/mnt/efs" in cfg["docker"]["run_options"]


# Field names and types of KubeRay's RayJob v1 CRD (ray-project/kuberay, ray-operator/config/crd/bases/
# ray.io_rayjobs.yaml at feeaf72f): what this manifest uses, and what the CRD requires.
RAYJOB_SPEC = {"entrypoint": str, "backoffLimit": int, "shutdownAfterJobFinishes": bool,
               "ttlSecondsAfterFinished": int, "runtimeEnvYAML": str, "rayClusterSpec": dict, "submissionMode": str,
               "submitterPodTemplate": dict}
CLUSTER_SPEC = {"rayVersion": str, "authOptions": dict, "headGroupSpec": dict, "workerGroupSpecs": list,
                "enableInTreeAutoscaling": bool, "autoscalerOptions": dict}
HEAD_REQUIRED, HEAD_FIELDS = {"template"}, {"template", "rayStartParams", "serviceType"}
WORKER_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
WORKER_FIELDS = WORKER_REQUIRED | {"replicas", "rayStartParams"}


def test_rayjob_uses_kuberay_fields_and_a_reachable_authenticated_dashboard():
    job, docs = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    for k, v in spec.items():
        assert k in RAYJOB_SPEC and isinstance(v, RAYJOB_SPEC[k]), k
    rc = spec["rayClusterSpec"]
    for k, v in rc.items():
        assert k in CLUSTER_SPEC and isinstance(v, CLUSTER_SPEC[k]), k
    assert rc["authOptions"] == {"mode": "token"} and rc["rayVersion"] == "2.60.0"
    head = rc["headGroupSpec"]
    assert HEAD_REQUIRED <= set(head) <= HEAD_FIELDS
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values())  # the CRD's rayStartParams is map[string]string
    assert params["dashboard-host"] not in ("127.0.0.1", "localhost")  # KubeRay reaches it through the Service
    assert params["num-cpus"] == "0" and head.get("serviceType", "ClusterIP") == "ClusterIP"  # never exposed outside
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
    for g in rc["workerGroupSpecs"]:
        assert WORKER_REQUIRED <= set(g) <= WORKER_FIELDS
    for pod in pods:
        c = pod["containers"][0]
        assert "command" not in c and "args" not in c  # KubeRay generates the container's `ray start`
        assert c["image"] == _image()
        shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in c["volumeMounts"])
        claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert not claims or "PersistentVolumeClaim" in docs  # any PVC it mounts is defined in the file
        assert pod["serviceAccountName"] in {d["metadata"]["name"] for d in docs.values() if d["kind"] == "ServiceAccount"}
    assert spec["backoffLimit"] >= 1


def test_rayjob_entrypoint_resumes_and_names_files_the_image_has():
    job, _ = _rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "sparsecse", "sweep"]
    assert "--resume-if-exists" in argv  # a retried attempt continues the run
    assert argv[argv.index("--out") + 1].startswith("s3://")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    copied = {m.group(2).rstrip("/") for m in re.finditer(r"^COPY (--\S+ )*\S+ \./(\S+)$", dockerfile, re.M)}
    config = Path(argv[4])
    rel = config.relative_to(workdir)
    assert rel.parts[0] in copied and (REPO / rel).is_file(), config
    # the sweep config parses (the image carries this checkout's sweeps/)
    from sparsecse.core.config import load_config

    load_config(REPO / rel)


def test_no_node_or_pod_downloads_the_data_or_the_model_from_the_hub():
    """Both files run from the copy staged once in the bucket (`sparsecse data stage`): no set-up command or init
    container fetches per node, and the job's data dir and model are staged URIs in the run's bucket. The RayJob's
    GPU pods start at zero and come on the sweep's demand (the driver asks: request_resources)."""
    cfg = _gpu_cluster()
    for k in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("data fetch" in c for c in cfg.get(k, [])), k
    job, _ = _rayjob()
    assert not any(c["name"] == "fetch-data" or "fetch" in str(c.get("command", "")) for c in _containers(job))
    argv = shlex.split(job["spec"]["entrypoint"])
    bucket = argv[argv.index("--out") + 1].split("/")[2]
    assert argv[argv.index("--data-dir") + 1] == f"s3://{bucket}/staged/data"
    sets = dict(a.split("=", 1) for a in argv[argv.index("--set") + 1::2] if "=" in a)
    assert sets["model.name"].startswith(f"s3://{bucket}/staged/models/bert-base-uncased@")
    rc = job["spec"]["rayClusterSpec"]
    assert rc["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] == 0 == g.get("replicas", 0) for g in rc["workerGroupSpecs"])
    workers = [t for t in cfg["available_node_types"].values() if "min_workers" in t]
    assert workers and all(t["min_workers"] == 0 for t in workers)


def test_dockerfile_installs_with_the_readme_command():
    readme = (REPO / "README.md").read_text()
    run = re.search(r"^RUN (pip install .+)$", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    # the README's main-job and test commands install with this exact pip command (one source of truth)
    assert f"&& {run} && SPARSECSE_DATA_DIR" in readme, run
    assert (CLUSTER / "Dockerfile").read_text().count("FROM rayproject/ray:${RAY_VERSION}-py311") == 1
    pinned = re.search(r"ARG RAY_VERSION=(\S+)", (CLUSTER / "Dockerfile").read_text()).group(1)
    assert pinned == _rayjob()[0]["spec"]["rayClusterSpec"]["rayVersion"]
    image = _image()
    assert f"docker build -f cluster/Dockerfile -t {image} ." in (CLUSTER / "README.md").read_text()


# The CUDA that PyPI's Linux x86_64 torch wheel of each pinned version carries (its nvidia-*-cuXX requirements), and
# the oldest Linux driver that runs each CUDA major. A new torch pin must be added here, read off its wheel.
PYPI_TORCH_CUDA = {"2.13.0": "13.0"}
DRIVER_MIN = {"12": 525, "13": 580}


def test_the_image_ships_one_cuda_stack_and_states_the_driver_it_needs():
    """The base image's CUDA (a -cuXYZ tag) and the torch wheel's must be the same stack: a CUDA base with
    torch from the matching PyTorch index, or Ray's CPU base with PyPI's wheel, whose CUDA the file states;
    the driver minimum stated for that CUDA."""
    text = (CLUSTER / "Dockerfile").read_text()
    platform = re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-(\S+)$", text, re.M).group(1)
    torch_pin = re.search(r"torch==(\S+)", text).group(1)
    index = re.search(r"--index-url \S+/whl/(cu\d+|cpu)", text)
    stated = re.search(r"^# CUDA: (\d+)\.(\d+)\s+driver: >= (\d+)", text, re.M)
    assert stated, "the Dockerfile states the CUDA of its one stack and the driver it needs"
    cuda = f"{stated.group(1)}.{stated.group(2)}"
    if platform.startswith("cu"):  # the base's CUDA: torch must come from the same CUDA's index
        assert index and index.group(1) == platform and platform == f"cu{stated.group(1)}{stated.group(2)}", platform
    else:
        assert platform == "cpu" and index is None  # PyPI's wheel and its nvidia-* wheels: the only CUDA
        assert PYPI_TORCH_CUDA[torch_pin] == cuda, (torch_pin, cuda)
    assert int(stated.group(3)) >= DRIVER_MIN[stated.group(1)]
    assert f"driver >= {stated.group(3)}" in (CLUSTER / "README.md").read_text()


@pytest.mark.parametrize("flag", ["--resume", "--resume-if-exists"])
def test_sweep_resume_flags_refuse_what_they_cannot_do(tmp_path, flag):
    import subprocess
    import sys

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a sweep")
    r = subprocess.run([sys.executable, "-m", "sparsecse", "sweep", str(REPO / "sweeps" / "quickstart.yaml"), "--out",
                        str(tmp_path / "other"), flag], capture_output=True, text=True,
                       env={**os.environ, "SPARSECSE_DATA_DIR": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("holds no sweep" if flag == "--resume" else "already holds something else") in r.stderr


def test_the_rayjob_states_its_kuberay_minimum_and_the_older_operators_variant_is_the_same_job():
    """rayjob.yaml needs KubeRay >= 1.5.1 (authOptions) and says so; the variant for older operators is the same job
    with the token from a Secret in every container and the submitter instead of authOptions. Both tear the GPU pods
    down soon after the sweep, tolerate GPU taints and request the ephemeral storage the trials use."""
    import copy

    text = (CLUSTER / "rayjob.yaml").read_text()
    assert re.search(r"^# kuberay: >= 1\.5\.1 ", text, re.M) and "rayjob-kuberay-before-1.5.1.yaml" in text
    job, _ = _rayjob()
    older_docs = list(yaml.safe_load_all((CLUSTER / "rayjob-kuberay-before-1.5.1.yaml").read_text()))
    older = next(d for d in older_docs if d["kind"] == "RayJob")
    assert "authOptions" not in older["spec"]["rayClusterSpec"]
    submitter = older["spec"].pop("submitterPodTemplate")["spec"]["containers"][0]
    stripped = copy.deepcopy(older)
    for c in _containers(stripped) + [submitter]:
        names = {e["name"]: e for e in c.get("env", [])}
        assert names["RAY_AUTH_MODE"]["value"] == "token"
        assert names["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "sparsecse-ray-token"
        c["env"] = [e for e in c["env"] if not e["name"].startswith("RAY_AUTH_")]
        if not c["env"]:
            del c["env"]
    expect = copy.deepcopy(job)
    del expect["spec"]["rayClusterSpec"]["authOptions"]
    assert stripped == expect  # otherwise the very same job
    for j in (job, older):
        assert j["spec"]["ttlSecondsAfterFinished"] <= 300
        for g in j["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            res = pod["containers"][0]["resources"]
            assert res["requests"]["ephemeral-storage"] == res["limits"]["ephemeral-storage"]


def _containers(job: dict) -> list:
    rc = job["spec"]["rayClusterSpec"]
    pods = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
    return [c for p in pods for c in p["containers"] + p.get("initContainers", [])]


def test_the_grafana_dashboard_plots_the_sweeps_metrics_beside_rays_own():
    """cluster/grafana-sparsecse.json: every query names a metric the sweep exports (ray_adapter.record_metrics,
    as Ray's exporter prefixes it) or one Ray 2.60's own node agent exports; the trials' metrics are all plotted."""
    import ray

    from sparsecse.run.ray_adapter import METRICS

    dash = json.loads((CLUSTER / "grafana-sparsecse.json").read_text())
    ours = {f"ray_sparsecse_{stage}_{name}" for stage in ("trial", "stage1") for name in METRICS}
    agent = Path(ray.__file__).parent / "dashboard" / "modules"
    rays = (agent / "reporter" / "reporter_agent.py").read_text() + \
        (agent / "metrics" / "dashboards" / "default_dashboard_panels.py").read_text()
    used = set()
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        for t in p["targets"]:
            for name in re.findall(r"\b(ray_[a-z_]+)\{", t["expr"]):
                used.add(name)
                assert name in ours or f'"{name.removeprefix("ray_")}"' in rays or f"{name}{{" in rays, name
    assert {f"ray_sparsecse_trial_{n}" for n in METRICS} <= used and "ray_node_gpus_utilization" in used
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "SessionName"}


def test_the_image_exposes_the_gpu_and_the_head_can_only_touch_its_own_clusters_instances():
    """The NVIDIA runtime exposes no GPU unless the image asks for one (Ray's CPU base image does not); the head's
    IAM policy stops, starts, terminates and retags only instances tagged with this cluster's name."""
    import json

    docker = (CLUSTER / "Dockerfile").read_text()
    assert "NVIDIA_VISIBLE_DEVICES=all" in docker and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in docker
    policy = json.loads((CLUSTER / "iam" / "head-policy.json").read_text())
    name = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())["cluster_name"]
    risky = {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances", "ec2:DeleteTags"}
    for st in policy["Statement"]:
        acts = set(st["Action"] if isinstance(st["Action"], list) else [st["Action"]])
        if acts & risky:
            assert st["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == name, st
        if "ec2:CreateTags" in acts:
            cond = st["Condition"]["StringEquals"]
            assert cond.get("ec2:ResourceTag/ray-cluster-name") == name or cond.get("ec2:CreateAction") == "RunInstances"


def test_the_nodes_boot_aws_current_gpu_ami_by_its_ssm_parameter_with_room_for_the_image():
    """Every node type boots the Deep Learning Base OSS NVIDIA Driver GPU AMI (Ubuntu 22.04) through its public SSM
    parameter (EC2's resolve:ssm:, so no region-bound or stale id; Ray passes ImageId through to RunInstances
    unchanged unless it is empty or latest_dlami, its own 2021 Ubuntu 18.04 / CUDA 11.2 image), which the head's
    role may resolve; ssh_user matches the Ubuntu image; root volumes on the AMI's root device, sized for the CUDA
    image; cluster/README.md shows how to look the AMI up. KubeRay's GPU pods ask for what a default node group
    (a g5.12xlarge, a 20 GiB default disk) can give."""
    import json

    up = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    param = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    assert up["auth"]["ssh_user"] == "ubuntu"
    for name, node in up["available_node_types"].items():
        cfg = node["node_config"]
        assert cfg["ImageId"] == f"resolve:ssm:{param}", name
        (root,) = cfg["BlockDeviceMappings"]
        assert root["DeviceName"] == "/dev/sda1" and root["Ebs"]["VolumeSize"] >= 100, name
    policy = json.loads((CLUSTER / "iam" / "head-policy.json").read_text())
    ssm = [st for st in policy["Statement"] if "ssm:GetParameters" in st["Action"]]
    assert ssm and all(st["Resource"].startswith("arn:aws:ssm:*::parameter/aws/service/deeplearning/ami/") for st in ssm)
    readme = (CLUSTER / "README.md").read_text()
    assert param in readme and "aws ec2 describe-images" in readme
    assert readme.index("aws iam create-role") < readme.index("ray up -y cluster/gpu-cluster.yaml")  # roles first
    for f in ("rayjob.yaml", "rayjob-kuberay-before-1.5.1.yaml"):
        job = next(d for d in yaml.safe_load_all((CLUSTER / f).read_text()) if d["kind"] == "RayJob")
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            req = g["template"]["spec"]["containers"][0]["resources"]["requests"]
            assert int(req["cpu"]) <= 44 and int(req["memory"].rstrip("Gi")) <= 176, f  # a g5.12xlarge's allocatable
            assert int(req["ephemeral-storage"].rstrip("Gi")) <= 16, f  # of a 20 GiB default node disk
