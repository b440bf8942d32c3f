# flipray: `make demo`, `make test` and `make test-fast` on a fresh machine (Python >= 3.11, Debian/Ubuntu for ffmpeg).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_DATA ?= data/demo
DEMO_CLIPS ?= 600

.PHONY: install demo demo-local test test-fast clean

$(STAMP): pyproject.toml
	@command -v ffmpeg >/dev/null || { echo "installing ffmpeg (apt)"; $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq ffmpeg >/dev/null; }
	@python3 -c 'import sys; assert sys.version_info >= (3, 11), "flipray needs Python >= 3.11"'
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,test]'
	@touch $(STAMP)

install: $(STAMP)

# The whole path on the embedded default: synthesize -> S3 (moto) -> Ray job (2 workers) -> MLflow -> report.
demo: $(STAMP)
	$(PY) -m cluster.demo --data $(DEMO_DATA) --clips $(DEMO_CLIPS)

# The same set, trained in one process without Ray (the library alone).
demo-local: $(STAMP)
	@test -f $(DEMO_DATA)/manifest.jsonl || $(VENV)/bin/flipray synth --out $(DEMO_DATA) --clips $(DEMO_CLIPS) --seed 0
	$(VENV)/bin/flipray train-pretext --config demo --set data.root=$(DEMO_DATA) --run-name demo-$$(date +%Y%m%d-%H%M%S)

# The whole suite (what CI runs, .ci/run): trains models and starts moto, MLflow and Ray (15-20 minutes).
test: $(STAMP)
	$(PY) -m pytest

# Everything that needs no trained model and no service (tests not marked `slow`), on every core up to 4: a few
# minutes. `make test` stays in one process: there the background demo trainer takes the cores the tests leave idle.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -n auto --maxprocesses 4

clean:
	rm -rf $(VENV) data runs
