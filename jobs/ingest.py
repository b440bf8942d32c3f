"""Ray job entrypoint for ingest (the library's flipray.dataset.ingest; `flipray ingest` is the same command).

    ray job submit --working-dir . -- python -m jobs.ingest --videos /shared/videos --out s3://bucket/ds/
"""
import sys

from flipray.dataset.ingest import main

if __name__ == "__main__":
    sys.exit(main())
