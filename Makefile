# `make serve`, `make test` and `make bench` set everything up on a fresh machine, then serve /
# test / benchmark.
# All are idempotent: a second run only does what changed.

PYTHON ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/python -m pip
SUBJECTIVE := $(VENV)/bin/subjective
MODEL := models/SmolLM2-135M-Instruct
# The trained gated models: committed routing adapters (adapters/) over the dense base.
GATED := models/SmolLM2-SDT/config.json models/SmolLM2-STT/config.json
TORCH := torch==2.13.0+cpu
# PyPI holds only CUDA builds of torch; the CPU build comes from PyTorch's own index.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# chromium: the usage page's browser test (Playwright drives Debian's build, never downloads one).
DEBIAN_PACKAGES := redis-server prometheus python3.11-doc chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test bench loadtest faults setup system-deps lint

serve: setup $(MODEL)/config.json $(GATED)
	$(SUBJECTIVE) serve --model $(MODEL) --host 127.0.0.1 --port 8000 --allow-anonymous

test: setup $(MODEL)/config.json data/validation.txt $(GATED)
	$(VENV)/bin/python -m pytest

# End to end: dense vs SDT/STT and a hybrid (made in a temporary folder) through vLLM -> benchmarks/results/e2e_cpu.json and .png.
bench: setup $(MODEL)/config.json data/validation.txt $(GATED)
	$(VENV)/bin/python benchmarks/e2e.py --models sdt=models/SmolLM2-SDT stt=models/SmolLM2-STT

# A bounded mixed load (loopback) on a local server -> benchmarks/results/load.json and .png.
loadtest: setup $(MODEL)/config.json
	$(VENV)/bin/python loadtests/mixed_load.py --serve $(MODEL)

# Fault scenarios (Redis, server and engine deaths, ledger timeouts, full spool, clients
# leaving), the fuzzer and the budget race on real servers -> benchmarks/results/faults.json.
FAULT_TESTS := tests/test_faults.py tests/test_server_crash.py tests/test_server_engine_death.py \
	tests/test_server_fuzz.py \
	tests/test_server_hostile.py::test_concurrent_requests_overshoot_a_budget_by_at_most_one_reservation \
	tests/test_server_hostile.py::test_a_body_over_the_limit_is_413_and_health_stays_fast
faults: setup $(MODEL)/config.json
	rm -f benchmarks/results/faults.json
	SUBJECTIVE_FAULTS_REPORT=benchmarks/results/faults.json $(VENV)/bin/python -m pytest -q $(FAULT_TESTS)

lint: setup
	$(VENV)/bin/ruff check .

setup: system-deps $(VENV)/.installed

system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) --version >/dev/null 2>&1 || { echo "$(PYTHON) is required"; exit 1; }
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH) || $(PIP) install -q --index-url $(TORCH_CPU_INDEX) $(TORCH)
	$(PIP) install -q -e ".[cpu,dev]"
	# vLLM pulls these in; beside the CPU torch they break imports, and text models need none.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

$(MODEL)/config.json: | $(VENV)/.installed
	$(SUBJECTIVE) model import-smollm2 --output $(MODEL)

models/SmolLM2-%/config.json: adapters/SmolLM2-%/config.json \
		adapters/SmolLM2-%/routing_adapter.safetensors | $(MODEL)/config.json
	$(SUBJECTIVE) model install-adapter adapters/SmolLM2-$* --base $(MODEL) --output models/SmolLM2-$*

data/validation.txt: | $(VENV)/.installed $(MODEL)/config.json
	$(SUBJECTIVE) data build --output data --tokenizer $(MODEL)
