"""The Kubernetes manifests (k8s/): every overlay builds with kubectl and passes k8s/validate.py, and the validator
rejects each broken fixture in tests/k8s_fixtures/ for the right reason.

Needs kubectl on PATH (it builds the kustomizations; CI has it, so its absence is a failure, not a skip). The KubeRay
schemas are vendored in k8s/schemas/kuberay/.
"""

from __future__ import annotations

import importlib.util
import re
import runpy
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from flipray import tasks

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "k8s_fixtures"
OVERLAYS = ["dev", "gpu"]

_spec = importlib.util.spec_from_file_location("flipray_k8s_validate", REPO / "k8s" / "validate.py")
validate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = validate  # dataclasses look their module up while the module executes
_spec.loader.exec_module(validate)

JOB_ENTRYPOINTS = {
    "flipray-ingest": "python -m jobs.ingest --videos s3://flipray/raw/ --out s3://flipray/dataset/",
    "flipray-pretext": "python -m jobs.pretext --config /config/pretext.yaml --run-name flipray-pretext",
    # one table job per registered task that runs on the stereo set (flipray.tasks; doa needs 360 clips)
    **{f"flipray-{task}": f"python -m jobs.{task} --preset paper --out /tmp/flipray/downstream"
       for task in tasks.starting_from("flip")},
    "flipray-report": "python -m jobs.report --from-mlflow --runs /tmp/flipray/report",
    "flipray-sweep-localize": "python -m tuning.sweep --task localize --samples 16",
}

# dev runs the downstream tables at the demo preset (its CPU workers are small)
DEV_DEMO = ("flipray-localize", "flipray-spatialize", "flipray-separate", "flipray-analyze")


def entrypoints(overlay_name: str) -> dict[str, str]:
    if overlay_name != "dev":
        return JOB_ENTRYPOINTS
    return {n: e.replace("--preset paper", "--preset demo") if n in DEV_DEMO else e for n, e in JOB_ENTRYPOINTS.items()}


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
    assert {"raycluster-ray-v1.json", "rayjob-ray-v1.json"} <= set(schemas), validate.KUBERAY_SCHEMA_DIR
    # vendored: nothing at test time reads outside the repository
    assert validate.KUBERAY_SCHEMA_DIR.is_relative_to(REPO)
    assert "Apache License\n                           Version 2.0" in (validate.KUBERAY_SCHEMA_DIR / "LICENSE").read_text()
    assert "v1.7.0" in (validate.KUBERAY_SCHEMA_DIR / "README.md").read_text()


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
    assert {n: j["spec"]["entrypoint"] for n, j in jobs.items()} == entrypoints(name)
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
    assert ("flipray-minio" in of_kind(docs, "StatefulSet")) == (name == "dev")


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
    assert f"rayproject/ray:{ray}-py311-gpu" in bases, bases  # the alias published for every release
    assert all(validate.image_is_pinned(b) for b in bases), bases
    assert f'"mlflow[auth]=={mlflow}"' in dockerfile  # the basic-auth app needs the auth extra
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
def test_job_entrypoints_exist_and_take_their_options(job, monkeypatch, capsys):
    """Every RayJob's entrypoint is a module of this repository whose --help lists each option the manifest passes
    (the data root and storage come from FLIPRAY_DATA / FLIPRAY_STORAGE in the flipray-env ConfigMap)."""
    argv = JOB_ENTRYPOINTS[job].split()
    assert argv[:2] == ["python", "-m"], job
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"{job}: no module {module}"
    # `python -m module --help` in this process (runpy runs it as __main__, as the pod's python does): the same
    # parser, without paying a fresh interpreter's torch import per job
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    monkeypatch.delitem(sys.modules, module, raising=False)  # a fresh __main__, not the copy another test imported
    with pytest.raises(SystemExit) as exited:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    out = capsys.readouterr()
    assert exited.value.code in (0, None), f"{job}: {module} --help failed: {out.err[-2000:]}"
    for flag in (a for a in argv[3:] if a.startswith("--")):
        assert flag in out.out, f"{job}: {module} has no option {flag}"


# ------------------------------------------------------------------------------------------------------------------
# What a team needs on a real cluster (issue: resumable pretext, ingest from S3, object store, GPUs, identity, ...)

COMPONENTS = ["workload-identity", "kueue", "mlflow-ingress"]


def configmap(docs: list[dict], prefix: str) -> dict:
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix + "-"))


def with_components(tmp_path: Path, base: str, components: list[str]) -> list[dict]:
    """An overlay built with k8s/components/* added, as a team's own kustomization would."""
    import os
    rel = Path(os.path.relpath(REPO, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: flipray\n"
        f"resources: [{rel / 'k8s' / 'overlays' / base}]\n"
        f"components: [{', '.join(str(rel / 'k8s' / 'components' / c) for c in components)}]\n")
    return validate.build(tmp_path)


@pytest.mark.parametrize("name", OVERLAYS)
def test_pretext_job_passes_the_same_run_name_on_every_apply(name):
    """A retry, a re-apply or a lost head pod must land in the same Ray Train run and MLflow run: a fixed --run-name,
    not a time stamp or anything the shell would expand differently each time."""
    from jobs import pretext
    names = set()
    for _ in range(2):  # two independent builds (no cache): two applies
        job = of_kind(validate.build(REPO / "k8s" / "overlays" / name), "RayJob")["flipray-pretext"]
        argv = job["spec"]["entrypoint"].split()
        assert argv.count("--run-name") == 1, argv
        names.add(argv[argv.index("--run-name") + 1])
    assert len(names) == 1
    run_name = names.pop()
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", run_name), run_name  # no $VAR, no $(date), no spaces
    assert pretext.parse_args(["--run-name", run_name]).run_name == run_name


@pytest.mark.parametrize("name", OVERLAYS)
def test_ingest_reads_an_s3_prefix_of_the_stores_bucket(name):
    docs = overlay(name)
    argv = of_kind(docs, "RayJob")["flipray-ingest"]["spec"]["entrypoint"].split()
    source = argv[argv.index("--videos") + 1]
    data = configmap(docs, "flipray-env")["data"]["FLIPRAY_DATA"]
    assert source.startswith("s3://") and source.endswith("/")
    assert source.split("/")[2] == data.split("/")[2]  # the bucket the overlay's store (dev: MinIO) holds
    assert not source.startswith(data) and not data.startswith(source)  # raw videos and clips do not overlap


@pytest.mark.slow
def test_dev_overlay_runs_an_s3_store_and_creates_its_bucket(moto_server):
    """MinIO (StatefulSet with its PVC + Service) and the bucket Job; the Job's script runs for real against an S3
    endpoint (moto here, MinIO in the cluster) and is idempotent."""
    import boto3
    docs = overlay("dev")
    minio = of_kind(docs, "StatefulSet")["flipray-minio"]
    pod = minio["spec"]["template"]["spec"]
    assert minio["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert {m["name"] for m in pod["containers"][0]["volumeMounts"]} == {"data"}
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0]["env"]}
    assert env["MINIO_ROOT_USER"] == {"name": "flipray-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["MINIO_ROOT_PASSWORD"] == {"name": "flipray-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    service = of_kind(docs, "Service")["flipray-minio"]
    assert service["spec"]["selector"] == minio["spec"]["template"]["metadata"]["labels"]
    assert 9000 in [p["port"] for p in service["spec"]["ports"]]
    # The docs point the Secret's endpoint at that Service
    assert "--from-literal=AWS_ENDPOINT_URL=http://flipray-minio:9000" in (REPO / "docs" / "kubernetes.md").read_text()

    job = of_kind(docs, "Job")["flipray-create-bucket"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == of_kind(docs, "Deployment")["flipray-mlflow"]["spec"]["template"]["spec"][
        "containers"][0]["image"]
    assert container["envFrom"] == [{"secretRef": {"name": "flipray-s3"}}]
    bucket = configmap(docs, "flipray-env")["data"]["FLIPRAY_DATA"].split("/")[2]
    s3 = boto3.client("s3")
    if bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]:  # another test of the session made it
        for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=bucket)
    for _ in range(2):
        out = subprocess.run([sys.executable, *container["command"][1:], *container["args"]], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and f"bucket {bucket} is there" in out.stdout, out.stdout + out.stderr
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    for key in ("FLIPRAY_STORAGE", "MLFLOW_ARTIFACT_ROOT"):
        assert configmap(docs, "flipray-env")["data"][key].split("/")[2] == bucket


def job_request(job: dict, env: dict, configs: dict, monkeypatch) -> tuple[str | None, float, float]:
    """(preset, CPUs, GPUs) one task / trial / Train worker of a RayJob asks Ray for, as its entrypoint computes it
    with the overlay's flipray-env in its environment."""
    from flipray.config import load_config
    argv = job["spec"]["entrypoint"].split()
    module, args = argv[2], argv[3:]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if module == "jobs.pretext":
        cfg_path = args[args.index("--config") + 1]
        (Path(configs["dir"]) / Path(cfg_path).name).write_text(configs["data"][Path(cfg_path).name])
        cfg = load_config(str(Path(configs["dir"]) / Path(cfg_path).name))
        return cfg.preset, cfg.cluster.cpus_per_worker, 1.0 if cfg.cluster.use_gpu else 0.0
    if module == "tuning.sweep":
        from tuning.sweep import load_definition, trial_resources
        d = load_definition(args[args.index("--task") + 1])
        r = trial_resources(d)
        return d.get("preset"), r["cpu"], r["gpu"]
    if "--preset" in args:
        from jobs.downstream import parse_args
        parsed = parse_args(importlib.import_module("flipray.tasks." + module.split(".")[-1]), args)
        return parsed.preset, parsed.cpus, parsed.gpus
    return None, 0.0, 0.0


@pytest.mark.parametrize("name", OVERLAYS)
def test_gpu_overlay_gives_every_paper_or_small_job_gpus(name, tmp_path, monkeypatch):
    docs = overlay(name)
    env = configmap(docs, "flipray-env")["data"]
    configs = {"dir": str(tmp_path), "data": configmap(docs, "flipray-config")["data"]}
    seen = {}
    for job_name, job in of_kind(docs, "RayJob").items():
        preset, cpus, gpus = job_request(job, env, configs, monkeypatch)
        seen[job_name] = preset
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        if name == "dev":
            assert gpus == 0, f"{job_name} asks for a GPU on the CPU-only dev cluster"
            continue
        if preset in ("paper", "small"):
            assert gpus >= 1, f"{job_name} runs the {preset} preset without a GPU"
            # some GPU group of the job's own cluster can hold one task / trial / worker
            fits = [g for g in gpu_worker_groups(job["spec"]["rayClusterSpec"])
                    if float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= gpus
                    and float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) >= cpus]
            assert fits and all(g["maxReplicas"] >= 1 for g in fits), (job_name, groups)
    # the preset-less jobs are ingest and report; everything else was checked
    assert {n for n, p in seen.items() if p is None} == {"flipray-ingest", "flipray-report"}, seen


def test_task_resources_come_from_the_environment():
    from jobs.downstream import task_resources
    from tuning.sweep import trial_resources
    assert task_resources({}) == (1.0, 0.0)
    assert task_resources({"FLIPRAY_TASK_CPUS": "8", "FLIPRAY_TASK_GPUS": "0.5"}) == (8.0, 0.5)
    with pytest.raises(ValueError, match="FLIPRAY_TASK_GPUS='one'"):
        task_resources({"FLIPRAY_TASK_GPUS": "one"})
    d = {"resources": {"cpu": 2, "gpu": 0}}
    assert trial_resources(d, {}) == {"cpu": 2, "gpu": 0}
    assert trial_resources(d, {"FLIPRAY_TASK_GPUS": "1"}) == {"cpu": 2, "gpu": 1.0}


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_run_as_the_service_account_and_static_keys_are_optional(name):
    docs = overlay(name)
    assert set(of_kind(docs, "ServiceAccount")) == {"flipray"}
    for doc in docs:
        for path, role, pod in validate.pod_specs(doc):
            if doc["metadata"]["name"] == "flipray-postgres" or doc["metadata"]["name"] == "flipray-minio":
                continue  # the dev-only stores need no cloud identity
            assert pod.get("serviceAccountName") == "flipray", (validate.ident(doc), validate.fmt(path), role)
            if doc["kind"] == "Job":
                continue  # dev's bucket Job talks to MinIO with its keys
            for _, c in validate.containers(pod):
                for ref in c.get("envFrom", []):
                    if ref.get("secretRef", {}).get("name") == "flipray-s3":
                        assert ref["secretRef"].get("optional") is True, validate.ident(doc)
                for e in c.get("env", []):
                    key_ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
                    if key_ref.get("name") == "flipray-s3":
                        assert key_ref.get("optional") is True, (validate.ident(doc), e["name"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_rayjob_has_deadlines(name):
    for job_name, job in of_kind(overlay(name), "RayJob").items():
        spec = job["spec"]
        assert spec["preRunningDeadlineSeconds"] > 0, job_name
        assert spec["activeDeadlineSeconds"] > spec["preRunningDeadlineSeconds"], job_name


@pytest.mark.parametrize("name", OVERLAYS)
def test_mlflow_requires_authentication(name):
    docs = overlay(name)
    pod = of_kind(docs, "Deployment")["flipray-mlflow"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "--app-name=basic-auth" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"  # no job runner
    for var, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "username"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
                     ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "flipray-mlflow-auth", "key": key}
    ini_dir = env["MLFLOW_AUTH_CONFIG_PATH"]["value"].rsplit("/", 1)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == ini_dir[0])
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    ini = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])[
        "data"][ini_dir[1]]
    assert "admin_password" not in ini and "database_uri = sqlite:////var/lib/mlflow-auth/" in ini
    store = next(m for m in c["volumeMounts"] if m["mountPath"] == "/var/lib/mlflow-auth")
    claim = next(v for v in pod["volumes"] if v["name"] == store["name"])["persistentVolumeClaim"]["claimName"]
    assert claim in of_kind(docs, "PersistentVolumeClaim")
    # every Ray container (head, workers: the drivers and Train/Tune workers log to MLflow) carries the login
    for spec in [of_kind(docs, "RayCluster")["flipray"]["spec"]]:
        for _, role, ray_pod in validate.pod_specs({"kind": "RayCluster", "apiVersion": "ray.io/v1", "spec": spec}):
            names = {e["name"] for e in ray_pod["containers"][0].get("env", [])}
            assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names, role


SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$|CREDENTIAL)", re.I)
LITERALS = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY", r"://[^/\s:@]+:[^/\s@]+@",
                                    r"(?i)password\s*[=:]\s*\S", r"(?i)secret_access_key\s*[=:]")]


@pytest.mark.parametrize("name", OVERLAYS + ["gpu+components"])
def test_no_literal_credentials_in_the_build(name, tmp_path):
    import yaml
    docs = overlay(name) if name in OVERLAYS else with_components(tmp_path, "gpu", COMPONENTS)
    assert of_kind(docs, "Secret") == {}
    for doc in docs:
        for path, node in validate.walk(doc):
            if isinstance(node, dict) and isinstance(node.get("name"), str) and SECRETISH.search(node["name"]) \
                    and path[-2:-1] == ("env",):
                assert "value" not in node, f"{validate.ident(doc)} {validate.fmt(path)}: literal {node['name']}"
        text = yaml.safe_dump(doc)
        for pattern in LITERALS:
            assert not pattern.search(text), f"{validate.ident(doc)}: {pattern.pattern}"


def test_components_build_and_validate(tmp_path):
    """Workload identity, a Kueue queue and an MLflow Ingress, added to the gpu overlay, still pass the validator."""
    docs = with_components(tmp_path, "gpu", COMPONENTS)
    problems = validate.validate_documents(docs)
    assert problems == [], "\n".join(map(str, problems))
    annotations = of_kind(docs, "ServiceAccount")["flipray"]["metadata"]["annotations"]
    assert "eks.amazonaws.com/role-arn" in annotations
    jobs = of_kind(docs, "RayJob")
    assert jobs and all(j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "flipray" for j in jobs.values())
    ingress = of_kind(docs, "Ingress")["flipray-mlflow"]
    host = ingress["spec"]["rules"][0]["host"]
    args = of_kind(docs, "Deployment")["flipray-mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert host in allowed and "--app-name=basic-auth" in args
    assert configmap(docs, "flipray-env")["data"]["FLIPRAY_MLFLOW_UI"] == f"https://{host}"


def test_image_installs_exactly_the_pins(tmp_path):
    """The dependency layer installs k8s/requirements.txt, which equals pyproject.toml's pins; nothing else (no
    README.md, no code) is copied before it, so only a pin change rebuilds it."""
    import tomllib
    from packaging.requirements import Requirement
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"] + [d for e in ("ray", "mlflow", "dali") for d in project["optional-dependencies"][e]]
    listed = [line for line in (REPO / "k8s" / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert [str(Requirement(x)) for x in listed] == [str(Requirement(x)) for x in pins]
    assert all([s.operator for s in Requirement(x).specifier] == ["=="] for x in listed)
    check = subprocess.run([sys.executable, "k8s/requirements.py", "--check"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    # a pin changed in pyproject.toml without regenerating: --check fails, a run fixes it
    stale = tmp_path / "pyproject.toml"
    stale.write_text((REPO / "pyproject.toml").read_text().replace('"tqdm==4.70.1"', '"tqdm==4.70.2"'))
    out = tmp_path / "requirements.txt"
    out.write_text((REPO / "k8s" / "requirements.txt").read_text())
    args = [sys.executable, "k8s/requirements.py", "--pyproject", str(stale), "--out", str(out)]
    assert subprocess.run([*args, "--check"], cwd=REPO, capture_output=True, timeout=60).returncode == 1
    assert subprocess.run(args, cwd=REPO, capture_output=True, timeout=60).returncode == 0
    assert "tqdm==4.70.2" in out.read_text().splitlines()
    stale.write_text(stale.read_text().replace('"tqdm==4.70.2"', '"tqdm>=4"'))
    loose = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert loose.returncode == 2 and "'tqdm>=4' is not an exact pin" in loose.stderr

    # the Dockerfile's flipray stage: what is copied before the dependency install
    stage = (REPO / "k8s" / "Dockerfile").read_text().split("AS flipray-mlflow")[0].split("AS flipray\n", 1)[1]
    lines = [line.strip() for line in stage.splitlines() if line.strip() and not line.strip().startswith("#")]
    install = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install -r"))
    copies = [line.split()[-2] for line in lines[:install] if line.startswith("COPY")]
    assert copies == ["k8s/requirements.txt"], copies
    assert lines[install].split()[4] == "/tmp/requirements.txt" and "k8s/requirements.txt /tmp/requirements.txt" in \
        lines[install - 1]
    ignore = (REPO / "k8s" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!k8s/requirements.txt" in ignore
