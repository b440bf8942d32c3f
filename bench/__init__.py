"""flipray's benchmarks: decode, training step, profile, GPU, and the scaling projection.

    python -m bench.all                     # everything CPU-side in one sitting: JSON on stdout, a table on stderr
    python -m bench.all --quick             # the same in about 3 minutes with fewer samples
    python -m bench.decode                  # DALI CPU vs torchcodec vs the ffmpeg floor
    python -m bench.train                   # plain PyTorch vs Ray Train 1 and 2 workers
    python -m bench.profile --compare       # torch.profiler of the CPU step; before/after of the data-path fixes
    python -m bench.project --cpu docs/bench-cpu.json [--gpu OUT/gpu.json]   # 7M-sample run on 1-32 GPUs
    bench/gpu.sh OUT                        # on a GPU node (bench/gpu.sh --dry-run OUT runs it tiny on a CPU)

Benchmarks are not tests: figures depend on the machine and its load, so every module reports ratios to a floor or
baseline measured in the same run, and the machine and load average it ran at (docs/performance.md).
"""
