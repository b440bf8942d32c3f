"""Local services for flipray (Ray head, MLflow, moto S3) and the cloud cluster-launcher config.

`cluster.local` starts and stops the local services; see docs/cluster.md.
"""
