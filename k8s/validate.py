#!/usr/bin/env python3
"""Validate flipray's Kubernetes manifests offline, as strictly as the cluster would.

    python k8s/validate.py k8s/overlays/dev k8s/overlays/gpu

Each argument is a kustomization directory (built with `kubectl kustomize`) or a plain YAML file. Every document
of the build is checked against:

* schema       KubeRay kinds (ray.io) against the strict JSON Schemas made from the KubeRay v1.7.0 CRDs
               (vendored in k8s/schemas/kuberay/), every other kind with `kubernetes-validate`
               in strict mode for Kubernetes KUBERNETES_VERSION. Unknown fields fail, as they do with kubectl's
               server-side strict field validation. A kind that has no schema fails too.
* name         metadata.name is a DNS-1123 subdomain (Services: DNS-1035 label); RayCluster at most 53 and
               RayJob/RayService at most 47 characters and DNS-1035 labels (KubeRay's validation.go); worker
               group names unique DNS-1123 labels.
* ray-version  every Ray cluster spec has rayVersion == the ray pin in pyproject.toml.
* ray-auth     every Ray cluster spec turns token authentication on (authOptions.mode: token).
* ray-spec     operator rules the CRD schema does not encode: minReplicas <= replicas <= maxReplicas, no
               resources in both rayStartParams and the group's `resources`, no rayStartParams["labels"];
               RayJob: rayClusterSpec or clusterSelector, suspend/ttlSecondsAfterFinished need
               shutdownAfterJobFinishes, non-negative ttl/backoffLimit, positive activeDeadlineSeconds,
               SidecarMode without submitter settings, InteractiveMode without retries. Policy: a RayJob that
               creates a cluster must set shutdownAfterJobFinishes (or its cluster lives forever).
* ray-pod      Ray head/worker containers set CPU and memory limits and mount a memory-backed emptyDir at
               /dev/shm (Ray's object store).
* ref          every Secret/ConfigMap reference (env, envFrom, volumes, projected volumes, imagePullSecrets,
               authOptions.secretName, ...) resolves, with its key, to an object of the same build in the same
               namespace, after kustomize's name prefixes and hash suffixes; or, for Secrets only, to a name
               and key listed in k8s/base/external-secrets.txt (Secrets holding credentials are created by hand).
               References marked optional are skipped.
* selector     a workload's selector matches its pod template; a Service's selector matches some pod template.
* gpu          GPUs (nvidia.com/gpu, nvidia.com/mig-*, amd.com/gpu) are requested only by Ray worker groups,
               always as limits, and requests equal limits where both are given.
* image        every image is pinned: an explicit tag other than `latest`, or a digest.

Exit status: 0 when every path is clean, 1 when problems were found, 2 when a build failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]
KUBERAY_SCHEMA_DIR = REPO_ROOT / "k8s" / "schemas" / "kuberay"  # vendored, v1.7.0 (its README: source, license)
EXTERNAL_SECRETS_FILE = REPO_ROOT / "k8s" / "base" / "external-secrets.txt"
PYPROJECT = REPO_ROOT / "pyproject.toml"

# Core kinds are validated against this Kubernetes version's schemas (kubernetes-validate ships 1.25 to 1.37).
# 1.33 is within one minor version of the kubectl that builds the overlays (1.32), the supported skew; a newer
# cluster accepts everything 1.33 does.
KUBERNETES_VERSION = "1.33.0"

# KubeRay ray-operator/controllers/ray/utils/constant.go: the operator appends 6 characters to a RayJob's or
# RayService's name to name its RayCluster, and a RayCluster name must leave room for the pod name suffixes.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
GPU_RESOURCE = re.compile(r"^(nvidia\.com/(gpu|mig-.+)|amd\.com/gpu)$")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class BuildError(RuntimeError):
    """A kustomization could not be built (or kubectl is missing)."""


@dataclass(frozen=True)
class Problem:
    rule: str  # one of the rule names in the module docstring
    obj: str  # Kind/name (namespace/Kind/name when namespaced)
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.obj}: {self.message}"


# --------------------------------------------------------------------------------------------------- inputs


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise BuildError("kubectl is not on PATH: it is needed to build the kustomizations (`kubectl kustomize`)")
    return path


def build(path: Path) -> list[dict[str, Any]]:
    """The documents of a kustomization directory (built by kubectl) or of a YAML file."""
    path = Path(path)
    if path.is_dir():
        proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BuildError(f"kubectl kustomize {path} failed:\n{proc.stderr.strip()}")
        text = proc.stdout
    elif path.is_file():
        text = path.read_text()
    else:
        raise BuildError(f"{path}: no such kustomization directory or YAML file")
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise BuildError(f"{path}: a document is not a mapping: {doc!r:.80}")
    return docs


def pinned_version(package: str, pyproject: Path = PYPROJECT) -> str:
    """The exact version `package==X` pinned in pyproject.toml's [project] dependencies or optional-dependencies
    (ray and mlflow are extras)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = project["dependencies"] + [d for extra in project.get("optional-dependencies", {}).values() for d in extra]
    for dep in deps:
        req = Requirement(dep)
        if req.name.lower() == package.lower():
            pins = [spec.version for spec in req.specifier if spec.operator == "=="]
            if len(pins) == 1:
                return pins[0]
            raise ValueError(f"{pyproject}: {package} is not pinned with == ({dep!r})")
    raise ValueError(f"{pyproject}: {package} is not a dependency")


def load_external_secrets(path: Path = EXTERNAL_SECRETS_FILE) -> dict[str, frozenset[str]]:
    """NAME KEY [KEY ...] per line; '#' starts a comment."""
    secrets: dict[str, frozenset[str]] = {}
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            secrets[fields[0]] = frozenset(fields[1:])
    return secrets


# ------------------------------------------------------------------------------------------------- helpers


def ident(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    name = f"{doc.get('kind', '?')}/{meta.get('name', '?')}"
    return f"{meta['namespace']}/{name}" if meta.get("namespace") else name


def fmt(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def walk(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every (path, value) below node, depth first, node included."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, (*path, i))


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[tuple, str, dict[str, Any]]]:
    """(path, role, pod spec) for every pod spec in doc, core workloads and KubeRay kinds alike.

    role is "head" or "worker" inside a Ray cluster spec, "submitter" for a RayJob's submitter, else "pod".
    """
    for path, node in walk(doc):
        if isinstance(node, dict) and isinstance(node.get("containers"), list) and path[-1:] != ("metadata",):
            if "workerGroupSpecs" in path:
                role = "worker"
            elif "headGroupSpec" in path:
                role = "head"
            elif "submitterPodTemplate" in path:
                role = "submitter"
            else:
                role = "pod"
            yield path, role, node


def containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(pod.get(field) or []):
            if isinstance(c, dict):
                yield f"{field}[{i}]", c


def ray_cluster_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, RayClusterSpec) of a RayCluster, RayJob (unless it selects an existing cluster) or RayService."""
    if doc.get("apiVersion", "").split("/")[0] != "ray.io":
        return
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "RayCluster":
        yield "spec", spec
    elif kind == "RayJob" and isinstance(spec.get("rayClusterSpec"), dict):
        yield "spec.rayClusterSpec", spec["rayClusterSpec"]
    elif kind == "RayService" and isinstance(spec.get("rayClusterConfig"), dict):
        yield "spec.rayClusterConfig", spec["rayClusterConfig"]


# ------------------------------------------------------------------------------------------------- schemas


@lru_cache(maxsize=None)
def kuberay_validator(kind: str, version: str) -> jsonschema.protocols.Validator | None:
    path = KUBERAY_SCHEMA_DIR / f"{kind.lower()}-ray-{version}.json"
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def check_schema(doc: dict[str, Any]) -> list[Problem]:
    # Memoized on the document's content: overlays and fixtures share most documents, and the KubeRay schemas
    # are large enough for validation to dominate the run time.
    return list(_check_schema(json.dumps(doc, sort_keys=True)))


@lru_cache(maxsize=1024)
def _check_schema(doc_json: str) -> tuple[Problem, ...]:
    return tuple(_schema_problems(json.loads(doc_json)))


def _schema_problems(doc: dict[str, Any]) -> list[Problem]:
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [Problem("schema", ident(doc), "apiVersion and kind are required")]
    group, _, version = api_version.rpartition("/")
    if group == "ray.io":
        if not KUBERAY_SCHEMA_DIR.is_dir():
            raise FileNotFoundError(f"KubeRay schemas not found at {KUBERAY_SCHEMA_DIR} (part of the repository)")
        validator = kuberay_validator(kind, version)
        if validator is None:
            return [Problem("schema", ident(doc), f"no KubeRay schema for {api_version} {kind}")]
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        return [Problem("schema", ident(doc), f"{fmt(e.absolute_path) or '<root>'}: {e.message}") for e in errors]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [Problem("schema", ident(doc), f"{fmt(e.path) or '<root>'}: {e.message}")]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [Problem("schema", ident(doc), e.message)]
    return []


# --------------------------------------------------------------------------------------------------- rules


def check_names(doc: dict[str, Any]) -> list[Problem]:
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        return [Problem("name", ident(doc), "metadata.name is missing")]
    problems = []
    if kind in MAX_NAME_LENGTH:
        if len(name) > MAX_NAME_LENGTH[kind]:
            problems.append(Problem("name", ident(doc), f"{kind} name is {len(name)} characters, "
                                    f"KubeRay allows at most {MAX_NAME_LENGTH[kind]}"))
        if not DNS1035_LABEL.match(name):
            problems.append(Problem("name", ident(doc), f"{kind} name {name!r} is not a DNS-1035 label "
                                    "(lower-case letters, digits and '-', starting with a letter)"))
    elif kind == "Service":
        if len(name) > 63 or not DNS1035_LABEL.match(name):
            problems.append(Problem("name", ident(doc), f"Service name {name!r} is not a DNS-1035 label"))
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        problems.append(Problem("name", ident(doc), f"name {name!r} is not a DNS-1123 subdomain"))
    for path, spec in ray_cluster_specs(doc):
        seen = set()
        for i, group in enumerate(spec.get("workerGroupSpecs") or []):
            group_name = group.get("groupName")
            where = f"{path}.workerGroupSpecs[{i}].groupName"
            if not isinstance(group_name, str) or len(group_name) > 63 or not DNS1123_LABEL.match(group_name):
                problems.append(Problem("name", ident(doc), f"{where}: {group_name!r} is not a DNS-1123 label"))
            elif group_name in seen:
                problems.append(Problem("name", ident(doc), f"{where}: duplicate worker group {group_name!r}"))
            seen.add(group_name)
    return problems


def check_ray_cluster(doc: dict[str, Any], ray_version: str) -> list[Problem]:
    problems = []
    for path, spec in ray_cluster_specs(doc):
        if spec.get("rayVersion") != ray_version:
            problems.append(Problem("ray-version", ident(doc), f"{path}.rayVersion is {spec.get('rayVersion')!r}, "
                                    f"the pinned Ray (pyproject.toml) is {ray_version!r}"))
        if (spec.get("authOptions") or {}).get("mode") != "token":
            problems.append(Problem("ray-auth", ident(doc), f"{path}.authOptions.mode must be 'token' "
                                    "(Ray token authentication)"))
        head = spec.get("headGroupSpec") or {}
        groups = [(f"{path}.headGroupSpec", head)] + [
            (f"{path}.workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
        for where, group in groups:
            params = group.get("rayStartParams") or {}
            if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
                problems.append(Problem("ray-spec", ident(doc), f"{where}: resources are set in both rayStartParams "
                                        "and resources; use one"))
            if "labels" in params:
                problems.append(Problem("ray-spec", ident(doc), f"{where}: rayStartParams['labels'] is not "
                                        "supported; use the group's labels field"))
            pod = (group.get("template") or {}).get("spec") or {}
            if not pod.get("containers"):
                problems.append(Problem("ray-spec", ident(doc), f"{where}: the pod template has no container"))
                continue
            problems += check_ray_container(doc, f"{where}.template.spec", pod)
        for i, group in enumerate(spec.get("workerGroupSpecs") or []):
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            replicas = group.get("replicas", low)
            where = f"{path}.workerGroupSpecs[{i}]"
            if low > high:
                problems.append(Problem("ray-spec", ident(doc), f"{where}: minReplicas {low} > maxReplicas {high}"))
            elif not low <= replicas <= high:
                problems.append(Problem("ray-spec", ident(doc), f"{where}: replicas {replicas} is outside "
                                        f"[minReplicas {low}, maxReplicas {high}]"))
    return problems


def check_ray_container(doc: dict[str, Any], where: str, pod: dict[str, Any]) -> list[Problem]:
    """The Ray container (the first one, as KubeRay assumes) has CPU/memory limits and a memory-backed /dev/shm."""
    ray = pod["containers"][0]
    problems = []
    limits = (ray.get("resources") or {}).get("limits") or {}
    missing = [r for r in ("cpu", "memory") if r not in limits]
    if missing:
        problems.append(Problem("ray-pod", ident(doc), f"{where}.containers[0]: no {' and '.join(missing)} limit "
                                "(Ray sizes itself from the container limits)"))
    memory_volumes = {v.get("name") for v in pod.get("volumes") or []
                      if (v.get("emptyDir") or {}).get("medium") == "Memory"}
    if not any(m.get("mountPath") == "/dev/shm" and m.get("name") in memory_volumes
               for m in ray.get("volumeMounts") or []):
        problems.append(Problem("ray-pod", ident(doc), f"{where}.containers[0]: /dev/shm is not a memory-backed "
                                "emptyDir (Ray's object store lives there)"))
    return problems


def check_ray_job(doc: dict[str, Any]) -> list[Problem]:
    if doc.get("kind") != "RayJob" or not doc.get("apiVersion", "").startswith("ray.io/"):
        return []
    spec = doc.get("spec") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    selector = bool(spec.get("clusterSelector"))
    rules = [
        (spec.get("rayClusterSpec") is None and not selector, "one of rayClusterSpec or clusterSelector must be set"),
        (spec.get("suspend", False) and not shutdown, "suspend needs shutdownAfterJobFinishes: true"),
        (spec.get("suspend", False) and selector, "a RayJob with clusterSelector cannot be suspended"),
        (spec.get("ttlSecondsAfterFinished", 0) < 0, "ttlSecondsAfterFinished must be >= 0"),
        (spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown,
         "ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true"),
        (spec.get("backoffLimit", 0) < 0, "backoffLimit must be >= 0"),
        (spec.get("activeDeadlineSeconds", 1) <= 0, "activeDeadlineSeconds must be > 0"),
        (mode == "SidecarMode" and "submitterPodTemplate" in spec, "SidecarMode does not take a submitterPodTemplate"),
        (mode == "SidecarMode" and "submitterConfig" in spec, "SidecarMode does not take a submitterConfig"),
        (mode == "SidecarMode" and selector, "SidecarMode does not take a clusterSelector"),
        (mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0,
         "InteractiveMode does not allow backoffLimit > 0"),
        (spec.get("rayClusterSpec") is not None and not selector and not shutdown,
         "shutdownAfterJobFinishes must be true, or the job's Ray cluster outlives the job"),
    ]
    return [Problem("ray-spec", ident(doc), f"spec: {message}") for broken, message in rules if broken]


def check_gpus(doc: dict[str, Any]) -> list[Problem]:
    problems = []
    for path, role, pod in pod_specs(doc):
        for where, c in containers(pod):
            resources = c.get("resources") or {}
            limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
            for name in sorted({*limits, *requests}):
                if not GPU_RESOURCE.match(name):
                    continue
                loc = f"{fmt(path)}.{where}"
                if role != "worker":
                    problems.append(Problem("gpu", ident(doc), f"{loc} requests {name}: only Ray worker groups "
                                            f"may request GPUs (this is a {role} pod)"))
                elif name not in limits:
                    problems.append(Problem("gpu", ident(doc), f"{loc}: {name} must be set in limits"))
                elif name in requests and str(requests[name]) != str(limits[name]):
                    problems.append(Problem("gpu", ident(doc), f"{loc}: {name} request {requests[name]} != limit "
                                            f"{limits[name]}"))
    for path, spec in ray_cluster_specs(doc):
        num_gpus = ((spec.get("headGroupSpec") or {}).get("rayStartParams") or {}).get("num-gpus")
        if num_gpus not in (None, "0", 0):
            problems.append(Problem("gpu", ident(doc), f"{path}.headGroupSpec.rayStartParams: num-gpus={num_gpus}: "
                                    "only Ray worker groups may have GPUs"))
    return problems


def image_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]  # a registry host:port is not a tag
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest")


def check_images(doc: dict[str, Any]) -> list[Problem]:
    problems = []
    images = [(f"{fmt(path)}.{where}", c.get("image"))
              for path, _, pod in pod_specs(doc) for where, c in containers(pod)]
    images += [(f"{path}.autoscalerOptions", (spec.get("autoscalerOptions") or {}).get("image"))
               for path, spec in ray_cluster_specs(doc) if (spec.get("autoscalerOptions") or {}).get("image")]
    for where, image in images:
        if not isinstance(image, str) or not image_is_pinned(image):
            problems.append(Problem("image", ident(doc), f"{where}: image {image!r} is not pinned (use an explicit "
                                    "tag other than latest, or a digest)"))
    return problems


@dataclass(frozen=True)
class Ref:
    kind: str  # Secret or ConfigMap
    name: str
    keys: tuple[str, ...]
    where: str


def references(doc: dict[str, Any]) -> Iterator[Ref]:
    """Every non-optional Secret/ConfigMap reference in doc (the referenced objects themselves are skipped)."""
    if doc.get("kind") in ("Secret", "ConfigMap"):
        return
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    for path, node in walk(body):
        if not isinstance(node, dict) or node.get("optional") is True:
            continue
        last = path[-1] if path else None
        parent = path[-2] if len(path) > 1 else None
        items = tuple(i.get("key") for i in node.get("items") or [] if isinstance(i, dict) and "key" in i)
        if last in ("secretKeyRef", "configMapKeyRef"):
            kind = "Secret" if last == "secretKeyRef" else "ConfigMap"
            name, keys = node.get("name"), (node.get("key"),)
        elif last in ("secretRef", "nodePublishSecretRef"):  # envFrom, and volume plugins' LocalObjectReference
            kind, name, keys = "Secret", node.get("name"), ()
        elif last == "configMapRef":
            kind, name, keys = "ConfigMap", node.get("name"), ()
        elif last == "configMap" and "name" in node:  # volume or projected volume source
            kind, name, keys = "ConfigMap", node.get("name"), items
        elif last == "secret" and ("secretName" in node or "name" in node):  # volume / projected volume source
            kind, name, keys = "Secret", node.get("secretName", node.get("name")), items
        elif "secretName" in node:  # authOptions, ingress TLS, azureFile
            kind, name, keys = "Secret", node.get("secretName"), ()
        elif parent == "imagePullSecrets" and "name" in node:
            kind, name, keys = "Secret", node.get("name"), ()
        else:
            continue
        yield Ref(kind, name, tuple(k for k in keys if k is not None), fmt(path))


def check_references(docs: list[dict[str, Any]], external_secrets: dict[str, frozenset[str]]) -> list[Problem]:
    objects = {(d.get("kind"), (d.get("metadata") or {}).get("namespace"), (d.get("metadata") or {}).get("name")): d
               for d in docs if d.get("kind") in ("Secret", "ConfigMap") and d.get("apiVersion") == "v1"}
    problems = []
    for doc in docs:
        namespace = (doc.get("metadata") or {}).get("namespace")
        for ref in references(doc):
            target = objects.get((ref.kind, namespace, ref.name))
            if target is not None:
                present = {key for field in ("data", "stringData", "binaryData") for key in target.get(field) or {}}
                for key in ref.keys:
                    if key not in present:
                        problems.append(Problem("ref", ident(doc), f"{ref.where}: {ref.kind} {ref.name!r} has no key "
                                                f"{key!r} (keys: {', '.join(sorted(present)) or 'none'})"))
            elif ref.kind == "Secret" and ref.name in external_secrets:
                for key in ref.keys:
                    if key not in external_secrets[ref.name]:
                        problems.append(Problem("ref", ident(doc), f"{ref.where}: key {key!r} of the external Secret "
                                                f"{ref.name!r} is not declared in {EXTERNAL_SECRETS_FILE.name}"))
            else:
                hint = (f" or listed in {EXTERNAL_SECRETS_FILE.name}" if ref.kind == "Secret" else "")
                problems.append(Problem("ref", ident(doc), f"{ref.where}: {ref.kind} {ref.name!r} is not in the build"
                                        f" (namespace {namespace or '<none>'}){hint}"))
    return problems


def check_selectors(docs: list[dict[str, Any]]) -> list[Problem]:
    problems = []
    templates: list[tuple[str | None, dict[str, str]]] = []
    for doc in docs:
        namespace = (doc.get("metadata") or {}).get("namespace")
        spec = doc.get("spec") or {}
        if doc.get("kind") in WORKLOAD_KINDS:
            labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            templates.append((namespace, labels))
            match = (spec.get("selector") or {}).get("matchLabels") or {}
            if doc.get("kind") != "Job" and not match.items() <= labels.items():
                problems.append(Problem("selector", ident(doc), f"spec.selector.matchLabels {match} does not match "
                                        f"the pod template's labels {labels}"))
        elif doc.get("kind") == "Pod":
            templates.append((namespace, (doc.get("metadata") or {}).get("labels") or {}))
    for doc in docs:
        selector = (doc.get("spec") or {}).get("selector") if doc.get("kind") == "Service" else None
        if not selector or any(k.startswith("ray.io/") for k in selector):  # Ray pods are made by the operator
            continue
        namespace = (doc.get("metadata") or {}).get("namespace")
        if not any(ns == namespace and selector.items() <= labels.items() for ns, labels in templates):
            problems.append(Problem("selector", ident(doc), f"spec.selector {selector} matches no pod template "
                                    "in the build"))
    return problems


# ------------------------------------------------------------------------------------------------- drivers


def validate_documents(docs: list[dict[str, Any]], *, ray_version: str | None = None,
                       external_secrets: dict[str, frozenset[str]] | None = None) -> list[Problem]:
    """All problems in a set of documents (one kustomize build)."""
    ray_version = ray_version or pinned_version("ray")
    external_secrets = load_external_secrets() if external_secrets is None else external_secrets
    problems: list[Problem] = []
    for doc in docs:
        problems += check_schema(doc)
        problems += check_names(doc)
        problems += check_ray_cluster(doc, ray_version)
        problems += check_ray_job(doc)
        problems += check_gpus(doc)
        problems += check_images(doc)
    problems += check_references(docs, external_secrets)
    problems += check_selectors(docs)
    return problems


def validate_path(path: Path) -> list[Problem]:
    """Build path (kustomization directory or YAML file) and validate the result."""
    return validate_documents(build(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="kustomization directories or YAML files")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths:
        try:
            docs = build(path)
        except BuildError as e:
            print(f"FAIL {path}: {e}", file=sys.stderr)
            status = 2
            continue
        problems = validate_documents(docs)
        for problem in problems:
            print(f"{path}: {problem}")
        if problems:
            status = max(status, 1)
            print(f"FAIL {path}: {len(problems)} problem(s) in {len(docs)} documents")
        else:
            print(f"OK   {path}: {len(docs)} documents")
    return status


if __name__ == "__main__":
    sys.exit(main())
