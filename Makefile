# Brickyard: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1

.PHONY: install browser demo test lint typecheck bench fuzz clean vllm-env test-vllm testbed-weights

install: $(STAMP)

# torch is pinned to 2.13.0 in pyproject.toml: pip takes the CPU build from this machine's
# wheel directory instead of downloading several GB of CUDA wheels.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/brickyard demo --workdir .demo

# Rebuild the full test bed the repository ships (composer/testbed_weights/full-seed0, with its
# files.sha256) after a change to composer/testbed.py: its code version names the build.
testbed-weights: install
	$(BIN)/python -m composer.testbed ship --seed 0

lint: install
	$(BIN)/ruff check registry composer serving tests bench migrations
	$(BIN)/ruff format --check registry composer serving tests bench migrations

# The web page's tests (tests/registry/web) drive Debian's chromium through Playwright
# (Playwright's own browser download cannot work offline). No browser, no pass: the tests
# fail when chromium is missing, so an install failure here must stop the run too.
browser:
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	chromium --version

test: install lint browser
	$(BIN)/python -m pytest -q

typecheck: install
	$(BIN)/mypy registry composer serving/vllm_plugin/brickyard_vllm

# vLLM's CPU build pins transformers<5.20 (Brickyard: 5.23), so it gets its own virtualenv, made
# once per requirements file and kept outside the clone (first creation: several minutes).
VLLM_REQUIREMENTS := serving/vllm-requirements.txt
VLLM_VENV ?= $(HOME)/.cache/brickyard/vllm-venv-$(shell sha256sum $(VLLM_REQUIREMENTS) | cut -c1-12)

vllm-env:
	PYTHON=$(PYTHON) serving/vllm-env.sh $(VLLM_VENV)

# Integration tests against a real vLLM OpenAI server with Brickyard's LoRA resolver
# (tests/vllm, which plain `make test` does not collect).
test-vllm: install vllm-env
	BRICKYARD_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -q tests/vllm

bench: install
	$(BIN)/python bench/compose_speed.py
	$(BIN)/python bench/retrieval_quality.py
	$(BIN)/python bench/retrieval_latency.py
	$(BIN)/python bench/load.py --profile

fuzz: install
	$(BIN)/python bench/fuzz.py --examples 300
	$(BIN)/python bench/fuzz.py --examples 300 --backend postgresql

clean:
	rm -rf .demo .bench .pytest_cache .ruff_cache .mypy_cache
