"""The `flipray` command: one subcommand per job, each a module with its own `main(argv)`.

    flipray synth --out data/synth --clips 400 --seed 0      # synthetic spatial audio-visual scenes
    flipray train-pretext --config demo                      # the flip pretext task, plain PyTorch
    flipray ingest --videos ~/videos --out s3://bucket/ds/   # real videos into the clip store
    flipray check my-video.mp4 [--plot timeline.png]         # are its stereo channels swapped?
    flipray fix my-video.mp4 --out fixed.mp4                 # swap them back (video stream copied)
"""
from __future__ import annotations

import importlib
import os
import sys

from flipray.overrides import user_errors

COMMANDS = {
    "synth": ("flipray.synth.scenes", "generate synthetic spatial audio-visual clips"),
    "synth360": ("flipray.synth.scenes360", "generate synthetic 360-degree clips with FOA audio (and DOA sets)"),
    "train-pretext": ("flipray.pretext.train", "train the flip pretext task locally (plain PyTorch)"),
    "ingest": ("flipray.dataset.ingest", "cut videos into 10-s clips and upload them to the clip store (a Ray job)"),
    "check": ("flipray.check", "do a video's stereo channels look swapped? (verdict, timeline plot)"),
    "fix": ("flipray.check:fix_main", "write a copy of a video with its stereo channels swapped back"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help}" for name, (_, help) in COMMANDS.items()]
        print("usage: flipray COMMAND [options]   (flipray COMMAND --help for its options)\n\ncommands:\n"
              + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nflipray: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    # Before torch loads OpenMP: spin-waiting threads starve everything else on a shared machine (measured: a
    # 2-thread training process fell from ~38 to 2 samples/s next to other work). An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module_name, _, func = COMMANDS[argv[0]][0].partition(":")
    with user_errors(f"flipray {argv[0]}"):  # a bad --set, preset or config file: one line, exit 2
        result = getattr(importlib.import_module(module_name), func or "main")(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
