"""Table 4: audio spatialization (mono -> stereo upmixing) with every method as a Ray task (flipray/tasks/spatialize.py).

    python -m jobs.spatialize --data data/demo --preset demo --local --no-mlflow \
        --pretext flip=runs/dev-demo/checkpoint.pt --pretext mismatch=runs/dev-mismatch/checkpoint.pt \
        --pretext shift=runs/dev-shift/checkpoint.pt --out /tmp/sp
    ray job submit --working-dir . -- python -m jobs.spatialize --data s3://flipray/demo/ --preset small

Writes <out>/spatialize/spatialize.{md,json} (the table, with Wilcoxon tests on per-clip STFT distance), per-method
result.json, curves and stereo FLAC examples under <out>/spatialize/<method>/. Options: jobs/downstream.py.
"""
from flipray.overrides import user_errors
from jobs.downstream import entrypoint

main = entrypoint(__file__)  # the task named like this file

if __name__ == "__main__":
    with user_errors("python -m jobs.spatialize"):
        main()
