"""Ray job entrypoints, one module per `ray job submit` (see docs/architecture.md); each has `main(argv)`."""
