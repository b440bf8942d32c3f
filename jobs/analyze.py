"""Sec. 5.1: how much of the sound source's position the pretext audio embeddings hold (PC1 and a linear probe vs the
left/right energy difference and the true azimuth), the PCA-bin tracking strip, and Grad-CAM on the visual stream;
every method (flip, mismatch, shift pretext weights; random weights) as a Ray task.

    python -m jobs.analyze --data data/demo --preset demo --pretext flip=runs/dev-demo/checkpoint.pt \
        --pretext mismatch=runs/dev-mismatch/checkpoint.pt --pretext shift=runs/dev-shift/checkpoint.pt \
        --local --no-mlflow --out /tmp/an
    ray job submit --working-dir . -- python -m jobs.analyze --data s3://flipray/demo/ --preset small \
        --pretext flip=models:/flipray-pretext/latest

Writes <out>/analyze/analyze.{md,json} and per method scatter.png, tracking.png, gradcam.png, result.json.
Metrics and their definitions: flipray/tasks/analyze.py. Options: jobs/downstream.py.
"""
from flipray.overrides import user_errors
from jobs.downstream import entrypoint

main = entrypoint(__file__)  # the task named like this file

if __name__ == "__main__":
    with user_errors("python -m jobs.analyze"):
        main()
