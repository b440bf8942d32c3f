"""DALI pipelines that yield flipray's batch dict: `pretext.DaliClipLoader` (training),
`gpu_check` (device="gpu" on a GPU node). Imported on demand, so flipray runs without DALI installed."""
