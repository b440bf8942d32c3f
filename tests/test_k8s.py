"""The Kubernetes manifests (k8s/): every overlay builds with kubectl and passes k8s/validate.py, and the validator
rejects each broken fixture in tests/k8s_fixtures/ for the right reason.

Needs kubectl on PATH (it builds the kustomizations; it is on CI's machine, so its absence is a failure, not a skip).
The KubeRay schemas are vendored in k8s/schemas/.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "k8s_fixtures"
OVERLAYS = ["dev", "gpu"]

_spec = importlib.util.spec_from_file_location("flipray_k8s_validate", REPO / "k8s" / "validate.py")
validate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = validate  # dataclasses look their module up while the module executes
_spec.loader.exec_module(validate)

JOB_ENTRYPOINTS = {
    "flipray-ingest": "python -m jobs.ingest --videos /data/raw --out s3://flipray/dataset/",
    "flipray-pretext": "python -m jobs.pretext --config /config/pretext.yaml",
    "flipray-localize": "python -m jobs.localize --preset paper --out /tmp/flipray/downstream",
    "flipray-spatialize": "python -m jobs.spatialize --preset paper --out /tmp/flipray/downstream",
    "flipray-separate": "python -m jobs.separate --preset paper --out /tmp/flipray/downstream",
    "flipray-analyze": "python -m jobs.analyze --preset paper --out /tmp/flipray/downstream",
    "flipray-report": "python -m jobs.report --from-mlflow --runs /tmp/flipray/report",
    "flipray-sweep-localize": "python -m tuning.sweep --task localize --samples 16",
}

# fixture -> (the one rule it breaks, a fragment of the message)
NEGATIVE_FIXTURES = {
    "bad-ray-version": ("ray-version", "'2.59.0'"),
    "rayjob-name-too-long": ("name", "48 characters, KubeRay allows at most 47"),
    "raycluster-name-not-dns-label": ("name", "not a DNS-1035 label"),
    "raycluster-unknown-field": ("schema", "'replicas' was unexpected"),
    "dangling-secret-ref": ("ref", "Secret 'flipray-aws' is not in the build"),
    "missing-configmap-key": ("ref", "has no key 'MLFLOW_ARTIFACTS_ROOT'"),
    "gpu-on-head": ("gpu", "only Ray worker groups may request GPUs"),
    "image-latest": ("image", "'postgres:latest' is not pinned"),
    "image-untagged": ("image", "'rayproject/ray' is not pinned"),
    "deployment-unknown-field": ("schema", "'readinessprobe' was unexpected"),
    "service-unknown-field.yaml": ("schema", "'targetport' was unexpected"),
    "token-auth-off": ("ray-auth", "authOptions.mode must be 'token'"),
    "rayjob-keeps-cluster": ("ray-spec", "shutdownAfterJobFinishes"),
    "worker-without-shm": ("ray-pod", "/dev/shm"),
    "service-selects-nothing": ("selector", "matches no pod template"),
}


@lru_cache(maxsize=None)
def built(path: Path) -> tuple:
    return tuple(validate.build(path))


def overlay(name: str) -> list[dict]:
    return list(built(REPO / "k8s" / "overlays" / name))


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def gpu_worker_groups(cluster_spec: dict) -> list[dict]:
    return [g for g in cluster_spec.get("workerGroupSpecs", [])
            for c in g["template"]["spec"]["containers"]
            if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]


def test_prerequisites_are_there():
    assert shutil.which("kubectl"), "kubectl is required to build the kustomizations (it is on CI's machine)"
    schemas = sorted(p.name for p in validate.KUBERAY_SCHEMA_DIR.glob("*.json"))
    assert {"raycluster-ray-v1.json", "rayjob-ray-v1.json"} <= set(schemas), "KubeRay schemas missing"
    assert validate.KUBERAY_SCHEMA_DIR.is_relative_to(REPO)  # self-contained: nothing read from beside the repo


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_is_valid(name):
    problems = validate.validate_documents(overlay(name))
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_contents(name):
    docs = overlay(name)
    assert {d["metadata"].get("namespace") for d in docs} == {"flipray"}
    assert set(of_kind(docs, "RayCluster")) == {"flipray"}
    jobs = of_kind(docs, "RayJob")
    assert {n: j["spec"]["entrypoint"] for n, j in jobs.items()} == JOB_ENTRYPOINTS
    cluster_spec = of_kind(docs, "RayCluster")["flipray"]["spec"]
    for job_name, job in jobs.items():
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, job_name
        assert spec["backoffLimit"] >= 0 and "submitterPodTemplate" in spec, job_name
        # The overlay's replacement copies the (patched) RayCluster spec into every job.
        assert spec["rayClusterSpec"] == cluster_spec, f"{job_name} does not run on the overlay's cluster shape"
        assert job["metadata"]["labels"]["flipray.io/job"] == job_name.removeprefix("flipray-")
    assert "flipray-mlflow" in of_kind(docs, "Deployment") and "flipray-mlflow" in of_kind(docs, "Service")
    mlflow_args = of_kind(docs, "Deployment")["flipray-mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any(a.startswith("--allowed-hosts=") for a in mlflow_args)
    env = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("flipray-env-"))
    assert env["data"]["MLFLOW_TRACKING_URI"] == "http://flipray-mlflow:5000"
    assert {"FLIPRAY_DATA", "FLIPRAY_STORAGE"} <= env["data"].keys()
    # Credentials are never part of a build.
    assert of_kind(docs, "Secret") == {}
    assert ("flipray-postgres" in of_kind(docs, "StatefulSet")) == (name == "dev")


@pytest.mark.parametrize("name", OVERLAYS)
def test_job_configs_load(name, tmp_path):
    """The configs mounted at /config are valid flipray configs and read the clip store FLIPRAY_DATA names."""
    from flipray.config import load_config

    docs = overlay(name)
    configs = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("flipray-config-"))
    env = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("flipray-env-"))
    assert "pretext.yaml" in configs["data"]
    for file_name, text in configs["data"].items():
        (tmp_path / file_name).write_text(text)
        cfg = load_config(str(tmp_path / file_name))
        assert cfg.data.root == env["data"]["FLIPRAY_DATA"], file_name
    if name == "gpu":
        assert load_config(str(tmp_path / "pretext.yaml")).train.device == "cuda"


def test_gpu_overlay_autoscales_gpu_workers_only():
    spec = of_kind(overlay("gpu"), "RayCluster")["flipray"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = gpu_worker_groups(spec)
    assert groups, "the gpu overlay has no GPU worker group"
    for group in groups:
        assert group["minReplicas"] < group["maxReplicas"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in group["template"]["spec"].get("tolerations", []))
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in r for part in head.values() for r in part)
    assert gpu_worker_groups(of_kind(overlay("dev"), "RayCluster")["flipray"]["spec"]) == []


def test_rayversion_matches_the_pin_and_the_dockerfile():
    ray = validate.pinned_version("ray")
    mlflow = validate.pinned_version("mlflow")
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert f"rayproject/ray:{ray}-py311-cu130" in bases, bases
    assert all(validate.image_is_pinned(b) for b in bases), bases
    assert f'"mlflow=={mlflow}"' in dockerfile
    for name in OVERLAYS:
        assert of_kind(overlay(name), "RayCluster")["flipray"]["spec"]["rayVersion"] == ray


def test_external_secrets_are_documented():
    """Every hand-made Secret, with all its keys, has a `kubectl create secret generic` step in the docs."""
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    commands = {m.group(1): m.group(0) for m in
                re.finditer(r"kubectl create secret generic (\S+)(?:[^\n]*\\\n)*[^\n]*", docs)}
    external = validate.load_external_secrets()
    assert external, "k8s/base/external-secrets.txt lists no Secret"
    for name, keys in external.items():
        assert name in commands, f"docs/kubernetes.md has no `kubectl create secret generic {name}` step"
        for key in keys:
            assert f"--from-literal={key}=" in commands[name], f"the {name} step does not set {key}"


@pytest.mark.parametrize("fixture", sorted(NEGATIVE_FIXTURES))
def test_broken_manifest_is_rejected(fixture):
    rule, fragment = NEGATIVE_FIXTURES[fixture]
    problems = validate.validate_documents(list(built(FIXTURES / fixture)))
    assert problems, f"{fixture} passed validation"
    assert {p.rule for p in problems} == {rule}, "\n".join(map(str, problems))
    assert any(fragment in p.message for p in problems), "\n".join(map(str, problems))


def test_every_fixture_is_covered():
    on_disk = {p.name for p in FIXTURES.iterdir() if p.name != "README.md"}
    assert on_disk == set(NEGATIVE_FIXTURES) | {"ok-name-prefix"}


def test_references_follow_kustomize_renames():
    docs = list(built(FIXTURES / "ok-name-prefix"))
    assert set(of_kind(docs, "RayCluster")) == {"x-flipray"}
    problems = validate.validate_documents(docs)
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize(("kind", "length", "ok"), [
    ("RayJob", 47, True), ("RayJob", 48, False), ("RayCluster", 53, True), ("RayCluster", 54, False)])
def test_ray_name_length_limits(kind, length, ok):
    doc = {"apiVersion": "ray.io/v1", "kind": kind, "metadata": {"name": "r" * length}, "spec": {}}
    assert (validate.check_names(doc) == []) == ok


@pytest.mark.parametrize(("image", "pinned"), [
    ("flipray:0.1.0", True), ("registry.local:5000/flipray:0.1.0", True), ("registry.local:5000/flipray", False),
    ("flipray", False), ("flipray:latest", False), ("flipray@sha256:" + "0" * 64, True)])
def test_image_pinning(image, pinned):
    assert validate.image_is_pinned(image) == pinned


def test_command_line():
    ok = subprocess.run([sys.executable, "k8s/validate.py", "k8s/overlays/dev"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "k8s/validate.py", str(FIXTURES / "gpu-on-head")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "[gpu]" in bad.stdout, bad.stdout + bad.stderr


@pytest.mark.parametrize("job", sorted(JOB_ENTRYPOINTS))
def test_job_entrypoints_exist_and_take_their_options(job):
    """Every RayJob's entrypoint is a module of this repository whose --help lists each option the manifest passes
    (the data root and storage come from FLIPRAY_DATA / FLIPRAY_STORAGE in the flipray-env ConfigMap)."""
    argv = JOB_ENTRYPOINTS[job].split()
    assert argv[:2] == ["python", "-m"], job
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"{job}: no module {module}"
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"{job}: {module} --help failed: {out.stderr[-2000:]}"
    for flag in (a for a in argv[3:] if a.startswith("--")):
        assert flag in out.stdout, f"{job}: {module} has no option {flag}"
