"""Table 5: audio-visual source separation (stereo mix-and-separate) with every method as a Ray task
(flipray/tasks/separate.py).

    python -m jobs.separate --data data/demo --preset demo --local --no-mlflow \
        --pretext flip=runs/dev-demo/checkpoint.pt --pretext mismatch=runs/dev-mismatch/checkpoint.pt \
        --pretext shift=runs/dev-shift/checkpoint.pt --out /tmp/sep
    python -m jobs.separate ... --methods flip+second --set second_pretext=runs/dev-mismatch/checkpoint.pt

Writes <out>/separate/separate.{md,json} (the table, with Wilcoxon tests on per-clip SDR), per-method result.json,
curves and FLAC examples (mixture, estimate, truth) under <out>/separate/<method>/. Options: jobs/downstream.py.
"""
from flipray.overrides import user_errors
from jobs.downstream import entrypoint

main = entrypoint(__file__)  # the task named like this file

if __name__ == "__main__":
    with user_errors("python -m jobs.separate"):
        main()
