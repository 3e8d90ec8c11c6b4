"""`sparsecse k8s-submit cluster/rayjob.yaml`: check the sweep inside the Kubernetes cluster, then submit the RayJob.

KubeRay retries a failed RayJob (`backoffLimit`) on a new RayCluster whatever made it fail: it cannot tell a config
or input error (the sweep's exit 2, which fails the same way every time) from a lost node. So the sweep is checked
first by a plain Kubernetes Job that runs the RayJob's own entrypoint with `--check`, in the same image, with the
same ServiceAccount (the same bucket access), on a CPU: its `podFailurePolicy` fails the Job at once on exit 2 (no
retry) and retries other failures (a pull error, an evicted pod). The RayJob is applied only when the check passes;
its retries are then left to what a check cannot see (a lost node, a preempted head).

kubectl does the talking (the user's kubeconfig and context); nothing here needs a Kubernetes client library.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from .. import RunFailed, SparseCSEError

CHECK_SUFFIX = "-check"


def _docs(path: Path) -> list[dict]:
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SparseCSEError(f"{path}: cannot read it as YAML ({str(e).splitlines()[0]}); pass the RayJob file, "
                             "e.g. cluster/rayjob.yaml") from None
    odd = next((d for d in docs if not isinstance(d, dict)), None)
    if odd is not None:
        raise SparseCSEError(f"{path}: a YAML document is a {type(odd).__name__}, not a Kubernetes object; pass the "
                             "RayJob file, e.g. cluster/rayjob.yaml")
    if not any(d.get("kind") == "RayJob" for d in docs):
        raise SparseCSEError(f"{path}: holds no RayJob; pass the RayJob file, e.g. cluster/rayjob.yaml")
    return docs


def check_job(rayjob: dict) -> dict:
    """The validation Job for a RayJob: its entrypoint with --check, in the head's image and ServiceAccount."""
    name = rayjob["metadata"]["name"]
    entry = " ".join(str(rayjob["spec"].get("entrypoint", "")).split())
    if "sparsecse sweep" not in entry:
        raise SparseCSEError(f"RayJob {name}: spec.entrypoint does not run `sparsecse sweep`; nothing to check")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    check = {"name": "check", "image": container["image"], "command": ["bash", "-c", f"{entry} --check"],
             "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}}
    for key in ("env", "envFrom"):  # the same credentials/endpoint settings as the driver
        if key in container:
            check[key] = container[key]
    pod = {"restartPolicy": "Never", "containers": [check]}  # podFailurePolicy needs restartPolicy Never
    if "serviceAccountName" in head:
        pod["serviceAccountName"] = head["serviceAccountName"]
    policy = {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "check", "operator": "In", "values": [2]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},  # an evicted/preempted pod
    ]}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name + CHECK_SUFFIX, "labels": {"app.kubernetes.io/part-of": "sparsecse"}},
            "spec": {"backoffLimit": 3, "ttlSecondsAfterFinished": 3600, "podFailurePolicy": policy,
                     "template": {"spec": pod}}}


def _kubectl(kubectl: str, namespace: str | None, *args: str, stdin: str | None = None) -> str:
    cmd = [kubectl, *(["-n", namespace] if namespace else []), *args]
    try:
        p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SparseCSEError(f"{kubectl}: not found; install kubectl and point it at your cluster "
                             "(kubectl config current-context)") from None
    if p.returncode:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise SparseCSEError(f"kubectl {' '.join(args[:2])}: failed ({err[-1] if err else f'exit {p.returncode}'})")
    return p.stdout


def _outcome(job: dict) -> str | None:
    """"passed", "config" (exit 2: the pod failure policy failed it), "failed" (other failures) or None (running)."""
    for c in job.get("status", {}).get("conditions", []):
        if c.get("status") != "True":
            continue
        if c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "passed"
        if c.get("type") in ("Failed", "FailureTarget"):
            return "config" if c.get("reason") == "PodFailurePolicy" else "failed"
    return None


def submit(path: str | Path, namespace: str | None = None, timeout_s: float = 900.0, kubectl: str = "kubectl",
           poll_s: float = 5.0, clock=time.monotonic, sleep=time.sleep) -> str:
    """Apply the file's other objects, run the check Job, and apply the RayJob only when it passed."""
    path = Path(path)
    docs = _docs(path)
    rayjob = next(d for d in docs if d.get("kind") == "RayJob")
    job = check_job(rayjob)
    name = job["metadata"]["name"]
    others = [d for d in docs if d.get("kind") != "RayJob"]  # the ServiceAccount the check runs as
    if others:
        _kubectl(kubectl, namespace, "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                            "items": others}))
    _kubectl(kubectl, namespace, "delete", "job", name, "--ignore-not-found", "--wait=true")
    _kubectl(kubectl, namespace, "apply", "-f", "-", stdin=json.dumps(job))
    print(f"[k8s] checking the sweep in the cluster (job/{name}) ...", flush=True)
    deadline = clock() + timeout_s
    while (outcome := _outcome(json.loads(_kubectl(kubectl, namespace, "get", "job", name, "-o", "json")))) is None:
        if clock() > deadline:
            raise SparseCSEError(f"job/{name}: the check did not finish within {timeout_s:g} s (kubectl describe "
                                 f"job/{name}: an image that cannot be pulled? no node with a free CPU?); nothing "
                                 "was submitted")
        sleep(poll_s)
    if outcome != "passed":
        logs = _kubectl(kubectl, namespace, "logs", f"job/{name}", "--tail", "20").strip().splitlines()
        last = logs[-1] if logs else "no log"
        if outcome == "config":  # exit 2: fix the config or the data; a retry would fail the same way
            raise SparseCSEError(f"{path}: the sweep's check failed: {last}; fix it and run k8s-submit again "
                                 "(nothing was submitted)")
        raise RunFailed(f"job/{name}: the check failed without a config error ({last}); see kubectl logs "
                           f"job/{name} (nothing was submitted)")
    _kubectl(kubectl, namespace, "apply", "-f", str(path))
    return (f"[k8s] check passed; RayJob {rayjob['metadata']['name']} submitted — watch it with kubectl get rayjob "
            f"{rayjob['metadata']['name']} -w")
