"""Table 3: sounding-object tracking from stereo sound and a reference frame, every method as a Ray task.

    python -m jobs.localize --data data/demo --preset demo --pretext flip=runs/dev-demo/checkpoint.pt \
        --methods flip,scratch,visual-context,stereo-audio --local --no-mlflow --out /tmp/loc
    ray job submit --working-dir . -- python -m jobs.localize --data s3://flipray/demo/ --preset small \
        --pretext flip=models:/flipray-pretext/latest

Methods, metrics and ground truth: flipray/tasks/localize.py. Options: jobs/downstream.py.
"""
from flipray.overrides import user_errors
from jobs.downstream import entrypoint

main = entrypoint(__file__)  # the task named like this file

if __name__ == "__main__":
    with user_errors("python -m jobs.localize"):
        main()
