"""The demo model of the suite's `demo_run` fixture, made in a process of its own at the lowest CPU priority (started
by tests/conftest.py when the session has tests that use it; not collected):

    python tests/_demo_model.py OUT_DIR

Renders the demo set (600 clips, seed 0, as `make demo`) into OUT_DIR/demo, trains the `demo` preset on it with
every core into OUT_DIR/runs/demo, and writes what `flipray.pretext.train.main` returned to OUT_DIR/returned.json.
"""
import json
import os
import sys
import threading
import time
from pathlib import Path


def exit_with(parent: int) -> None:
    """Ends this process (and so its rendering workers) when the pytest that started it is gone, even if it was
    killed without running its fixtures' teardown."""
    while os.getppid() == parent:
        time.sleep(2)
    os._exit(1)


def main(out: str) -> None:
    threading.Thread(target=exit_with, args=(os.getppid(),), daemon=True).start()
    # Nice 19: while other tests run, this takes only the CPU time they leave idle (a test on one thread, a service
    # starting, a drill waiting for a node); the tests that need the model run last, when it has every core.
    os.nice(19)
    from flipray.pretext import train
    from flipray.synth import scenes

    base = Path(out)
    scenes.generate(base / "demo", clips=600, seed=0, workers=2)
    report = train.main(["--config", "demo", "--run-name", "demo", "--set", f"data.root={base / 'demo'}",
                         "--set", f"train.out_dir={base / 'runs'}",
                         "--set", f"train.threads={len(os.sched_getaffinity(0))}"])
    (base / "returned.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
