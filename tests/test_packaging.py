"""Packaging: only the library installs, every import the project makes is declared, moto stays out of the runtime,
and the image finds what it runs (jobs/, tuning/*.yaml) where a checkout does.

    .venv/bin/python -m pytest tests/test_packaging.py -q
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LOCAL = {"flipray", "dali_pipelines", "jobs", "tuning", "cluster", "bench", "conftest"}
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "cv2": "opencv-python-headless", "sklearn": "scikit-learn", "PIL": "pillow",
                "nvidia": "nvidia-dali-cuda130", "kubernetes_validate": "kubernetes-validate",
                "botocore": "boto3"}  # botocore: boto3's own core, at the version boto3's pin requires


def requirements(*extras: str) -> set[str]:
    reqs = list(PROJECT["dependencies"]) if "core" in extras else []
    for extra in extras:
        for r in PROJECT["optional-dependencies"].get(extra, []):
            req = Requirement(r)
            reqs += ([str(x) for e in req.extras for x in PROJECT["optional-dependencies"][e]]
                     if req.name == "flipray" else [r])
    return {Requirement(r).name.lower() for r in reqs}


def third_party_imports(*folders: str) -> dict[str, str]:
    found = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_only_the_library_installs():
    from setuptools import find_packages
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(where=str(REPO), include=include)
    assert packages and {p.split(".")[0] for p in packages} == {"flipray", "dali_pipelines"}, packages


def test_every_import_is_declared():
    runtime = requirements("core", "ray", "mlflow", "dali")
    for name, where in third_party_imports("flipray", "dali_pipelines", "jobs", "tuning", "cluster", "bench").items():
        assert DISTRIBUTION.get(name, name).lower().replace("_", "-") in {r.replace("_", "-") for r in runtime}, \
            f"{where} imports {name}, which no runtime requirement installs"
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    tooling = runtime | requirements("test") | {Requirement(r).name.lower() for r in build}
    for name, where in third_party_imports("tests", "k8s").items():
        assert DISTRIBUTION.get(name, name).lower().replace("_", "-") in {r.replace("_", "-") for r in tooling}, \
            f"{where} imports {name}, which no requirement installs"


def test_moto_is_dev_and_test_only():
    assert "moto" not in requirements("core", "ray", "mlflow", "dali", "all")
    assert "moto" in requirements("dev") and "moto" in requirements("test")
    # nothing the image runs starts or imports moto (cluster/local.py, for `make demo`, and tests/ do; bench/ goes
    # through cluster/local.py's launcher, the one place that starts it)
    users = [str(p.relative_to(REPO)) for folder in ("flipray", "dali_pipelines", "jobs", "tuning", "bench")
             for p in (REPO / folder).rglob("*.py") if re.search(r"import moto|from moto|moto\.server", p.read_text())]
    assert users == [], users
    assert "'.[all,test]'" in (REPO / "Makefile").read_text()  # make demo's local S3 (cluster/local.py) has moto


def test_the_image_runs_jobs_and_sweeps_from_its_copy_of_the_repository():
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", dockerfile, flags=re.M)[0]
    assert f"ENV PYTHONPATH={workdir}" in dockerfile
    for folder in ("jobs", "tuning"):  # RayJob entrypoints; tuning/ brings its *.yaml sweep definitions
        assert f"COPY --chown=1000:100 {folder} ./{folder}" in dockerfile
        assert f"!{folder}/" in (REPO / "k8s" / "Dockerfile.dockerignore").read_text()
    # its install list (k8s/requirements.txt, from k8s/requirements.py) is the core and the ray, mlflow, dali extras
    assert "COPY --chown=1000:100 k8s/requirements.txt /tmp/requirements.txt" in dockerfile
    listed = {Requirement(line).name.lower() for line in (REPO / "k8s" / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    assert requirements("core", "ray", "mlflow", "dali") == listed
    assert "moto" not in listed  # not dev/test


def test_sweep_definitions_are_found_from_any_working_directory(tmp_path):
    code = "from tuning.sweep import load_definition, sweepable; print(sweepable(), load_definition('localize')['metric'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("] ")[1].strip() == "ap50" and "'localize'" in out.stdout
