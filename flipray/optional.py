"""Optional dependencies: Ray, MLflow and DALI are imported through `require`, inside the functions that need them.

    ray = require("ray")                                # instead of `import ray`
    MlflowClient = require("mlflow").MlflowClient       # instead of `from mlflow import MlflowClient`

The core library (pretext training, the downstream tasks, `flipray check` on a checkpoint file) needs none of them;
a missing one raises ImportError naming the pyproject extra that installs it. tests/test_layers.py holds flipray/
to this.
"""
from __future__ import annotations

import importlib

EXTRAS = {"ray": "ray", "mlflow": "mlflow", "nvidia.dali": "dali"}  # top-level module -> pyproject extra


def extra_for(module: str) -> str | None:
    """The extra that installs `module` (a dotted name), None for a module that is not optional."""
    return next((extra for top, extra in EXTRAS.items() if module == top or module.startswith(top + ".")), None)


def require(module: str):
    """Import `module` (e.g. "ray", "mlflow.exceptions", "nvidia.dali.fn"); if it is missing, say which extra
    installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = extra_for(module)
        if extra is None:
            raise
        raise ImportError(f"{module} is not installed: this needs flipray's {extra!r} extra "
                          f"(pip install 'flipray[{extra}]', or 'flipray[all]')") from e
