# make install: a virtual environment with the requirements; make test: install (with the extras), then test.
# make cifar: the paper's CIFAR-10 LLR run (a GPU job), then eval.py on it (resumes if stopped). make cifar-quick:
# minutes on a GPU. Variables: DATA_DIR (CIFAR-10: torchvision's, downloaded there if missing, or an ImageFolder
# tree; a resumed run and its evaluation use the directory the run recorded), GPUS (processes), PRECISION (no or
# bf16), ARGS (more flags for train_cifar.py, e.g. ARGS="--epochs 5"), BENCH_FLAGS (e.g. --bf16 --channels-last).
PYTHON    ?= python3
VENV      ?= .venv
PY         = $(VENV)/bin/python
DATA_DIR  ?=
GPUS      ?= 1
PRECISION ?= no
# one process: python itself, so that Ctrl-C reaches the trainer; several: accelerate launch
LAUNCH     = $(if $(filter-out 1,$(GPUS)),$(VENV)/bin/accelerate launch --num_processes $(GPUS) --multi_gpu \
             --num_machines 1 --mixed_precision $(PRECISION) --dynamo_backend no,ACCELERATE_MIXED_PRECISION=$(PRECISION) $(PY))

CIFAR_TAR ?= ../shared/data/cifar10-jpeg.tar.gz

.PHONY: install install-extras test cifar cifar-quick eval bench cpu-repro l2-compare gpu-report positive-control co-bench
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install-extras: $(VENV)/.extras  ## matplotlib for plots.py, pyautoattack for eval.py --autoattack
$(VENV)/.extras: requirements-extras.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-extras.txt
	touch $@

test: install install-extras
	$(PY) -m pip install -q pytest
	$(PY) -m pytest -q tests

# train (or resume) RUN with the given flags, then evaluate the checkpoint chosen on held-out training images
define train_and_eval
	@if [ -f $(1)/state.pt ]; then echo "resuming $(1)"; $(LAUNCH) train_cifar.py --resume $(1) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS); \
	else $(LAUNCH) train_cifar.py --data-dir $(or $(DATA_DIR),data/cifar10) --download --out $(1) $(2) $(ARGS); fi
	$(PY) eval.py $(1) --eps 8/255 $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --n $(3)
endef

cifar: install  ## WRN-28-8 softplus, LLR, ε = 8/255: the authors' config (README table), 128 epochs
	$(call train_and_eval,runs/cifar-llr,--method llr,10000)

cifar-quick: install  ## PreAct ResNet-18, LLR with 2 inner steps, 10 epochs
	$(call train_and_eval,runs/cifar-quick,--method llr --llr-steps 2 --arch preact-resnet18 --epochs 10,1000)

eval: install  ## make eval CKPT=runs/x (or a .safetensors) [EPS=8/255] [N=1000]
	$(PY) eval.py $(CKPT) --eps $(or $(EPS),8/255) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --n $(or $(N),1000)

bench: install  ## each method's step time as a ratio to plain, on this machine's device: runs/bench.json
	$(PY) bench.py $(BENCH_FLAGS)

data/cifar10-jpeg/train:  ## the JPEG copy of CIFAR-10, unpacked from CIFAR_TAR
	mkdir -p data/cifar10-jpeg && tar xzf $(CIFAR_TAR) -C data/cifar10-jpeg

cpu-repro: install install-extras data/cifar10-jpeg/train  ## the paper's central claim on a CPU: hours, resumable
	$(PY) -m experiments.cpu_repro

l2-compare: install data/cifar10-jpeg/train  ## certified (SOC) against empirical (LLR, ADV) l2 robustness: GPU for the evaluation
	$(PY) -m experiments.l2_compare

gpu-report: install install-extras  ## everything owed to a GPU, in resumable steps of under 8 minutes (needs a GPU); BUDGET=10: only what fits 10 min
	$(PY) -m experiments.gpu_report $(if $(wildcard data/cifar10-jpeg/train),,--archive $(CIFAR_TAR)) $(if $(BUDGET),--budget $(BUDGET))

positive-control: install install-extras data/cifar10-jpeg/train  ## can this pipeline overfit catastrophically? GradAlign's CNN, ~35 min on 2 cores
	OMP_NUM_THREADS=1 $(PY) -m experiments.positive_control --only train --activation relu & relu=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m experiments.positive_control --only train --activation softplus; softplus=$$?; \
	wait $$relu && exit $$softplus
	$(PY) -m experiments.positive_control --only report

co-bench: install install-extras data/cifar10-jpeg/train  ## LLR against the methods that claim to prevent catastrophic overfitting: <= 10 h on 2 cores, resumable
	for stage in explore train eval; do \
	  OMP_NUM_THREADS=1 $(PY) -m experiments.co_bench --only $$stage --worker 0/2 & first=$$!; \
	  OMP_NUM_THREADS=1 $(PY) -m experiments.co_bench --only $$stage --worker 1/2; second=$$?; \
	  wait $$first && [ $$second = 0 ] || exit 1; \
	done
	OMP_NUM_THREADS=1 $(PY) -m experiments.co_bench --only bench
	$(PY) -m experiments.co_bench --only report
