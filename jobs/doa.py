"""Table 6: direction-of-arrival estimation from FOA audio (flipray/tasks/doa.py), every row as a Ray task, tracked in MLflow.

    flipray synth360 --out data/doa-demo --doa --per-direction 20 --seed 1 --duration 3 --height 128
    python -m jobs.doa --data data/doa-demo --preset demo --pretext rotate=runs/rotate-demo/checkpoint.pt \
        --local --no-mlflow --out /tmp/doa
    ray job submit --working-dir . -- python -m jobs.doa --data s3://flipray/doa/ --preset small \
        --pretext rotate=models:/flipray-pretext-rotate/latest

Rows: scratch, rotate (the rotate pretext network, `flipray train-pretext --set train.task=rotate` on 360 clips),
svm-random, svm-rotate (one-shot linear SVMs on frozen embeddings) and intensity (active intensity vector).
"""
from flipray.overrides import user_errors
from jobs.downstream import entrypoint

main = entrypoint(__file__)  # the task named like this file

if __name__ == "__main__":
    with user_errors("python -m jobs.doa"):
        main()
