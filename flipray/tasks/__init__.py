"""The downstream tasks: one module each under flipray/tasks/, found by the contract they define.

    from flipray import tasks
    tasks.registry()            # {"analyze": <module>, "localize": ..., ...} in the paper's order
    tasks.get("localize")       # one task module; an unknown name says the closest one

A task module defines CONTRACT (see flipray/tasks/base.py for what each is). Adding a task means adding one module:
the sweep's task list, the demo's tables, the report's order, the Ray job `python -m jobs.downstream --task NAME`
and the contract test (tests/test_tasks.py) all come from here.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import pkgutil

from flipray.overrides import UsageError

CONTRACT = ("ORDER", "TABLE", "METHODS", "PAPER", "Config", "PRESETS", "run_trial")


@functools.cache
def registry() -> dict:
    """{task name: module} for every module of this package that defines CONTRACT, ordered by ORDER."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if all(hasattr(module, name) for name in CONTRACT):
            found.append(module)
    return {m.TABLE["task"]: m for m in sorted(found, key=lambda m: m.ORDER)}


def get(name: str):
    """The task module called `name`."""
    tasks = registry()
    if name not in tasks:
        close = difflib.get_close_matches(name, tasks, n=1)
        hint = f"did you mean {close[0]}?" if close else f"tasks are {list(tasks)}"
        raise UsageError(f"unknown task {name!r}; {hint}")
    return tasks[name]


def starting_from(pretext_task: str) -> list[str]:
    """The tasks whose networks come from `pretext_task`'s model (SHAPE_FROM, default flip): what a set of clips and
    the pretext models trained on it can run (the demo and the Kubernetes jobs: the stereo tasks)."""
    return [name for name, m in registry().items() if getattr(m, "SHAPE_FROM", "flip") == pretext_task]
