# pixart-lightning: `make test` and `make demo` work on a fresh machine with nothing installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# clean-fid needs a torchvision built for the installed torch; this pair lies on local disk here.
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# `make stage2 CONFIG=configs/pixart-xl2 RUN_ARGS="optim.lr=1e-4"`. On a Slurm login node, each stage as a batch
# job that starts when the previous stage's job succeeded (a queued one is found by squeue):
# `make stage1 stage2 stage3 LAUNCH=slurm SLURM_ARGS="--nodes 2 --gpus-per-node 8 --partition gpu --time 2-00:00:00"`
CONFIG ?= configs/demo
RUN_ARGS ?=
LAUNCH ?= local
SLURM_ARGS ?=

.PHONY: venv test slurm-install lint demo demo-long finetune-demo finetune stage1 stage2 stage3 stage4 tensorboard bench gpu-wheels gpu-check clean

venv: $(VENV)/.installed

# A torch/torchvision pair the base interpreter already has is kept (the venv sees it);
# otherwise the pinned pair is installed. Everything else is constrained to that pair so pip
# never swaps torch underneath it.
$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch, torchvision" 2>/dev/null; then \
		echo "keeping the existing torch/torchvision"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_PAIR)
	@$(PY) -c "import torch, torchvision; print('torch==' + torch.__version__.split('+')[0]); print('torchvision==' + torchvision.__version__.split('+')[0])" > $(VENV)/torch-constraints.txt
	$(PY) -m pip install -c $(VENV)/torch-constraints.txt -e '.[dev]'
	@touch $@

test: venv slurm-install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Slurm for the one-node test cluster of tests/test_slurm.py: apt-get as root, else a reason and its tests skip.
slurm-install:
	@bash tests/slurm_cluster.sh install

lint: venv
	$(VENV)/bin/ruff check .

# The four stages of the embedded default, offline, in minutes on 2 CPU cores.
demo: venv
	$(VENV)/bin/pixart-lightning run configs/demo $(RUN_ARGS)

# The demo's stages 1-2 with stage 2 three times longer: shape, position and size learned too (configs/demo-long).
demo-long: venv
	$(VENV)/bin/pixart-lightning run configs/demo-long $(RUN_ARGS)

# LoRA on the demo's stage-3 model: draw what captions call "red" in teal, other colours alone (docs/stages.md).
# `make demo` first when its weights are missing; then the fine-tune (its data: the teal world) and the before/after report.
finetune-demo: venv
	@[ -f runs/demo/stage3/final-ema.safetensors ] || $(MAKE) demo
	$(VENV)/bin/pixart-lightning run configs/finetune-demo $(RUN_ARGS)
	@for stage in runs/demo/stage3 runs/finetune-demo/stage3; do \
		$(VENV)/bin/pixart-lightning eval alignment --ckpt $$stage --recolor red=teal || exit 1; done

# Fine-tune the released XL/2 512 px weights on your photos (configs/finetune, README "Fine-tuning released weights"):
# ingest, caption (auto: only the images without one; llava: all), extract, train, export a diffusers pipeline,
# grids before and after; every step resumes. `make finetune DATA=/path/to/photos [CAPTION=llava] [LORA=16]`
DATA ?=
CAPTION ?= auto
LORA ?=
finetune: venv
	@[ -n "$(DATA)" ] || { echo "make finetune DATA=/path/to/photos [CAPTION=llava] [LORA=16] [RUN_ARGS=...]"; exit 2; }
	$(VENV)/bin/pixart-lightning finetune $(DATA) --caption $(CAPTION)$(if $(LORA), --lora $(LORA)) $(RUN_ARGS)

# stage4: the few-step student of stage 3 (consistency distillation; its config's stage4.yaml, docs/stages.md).
ifeq ($(LAUNCH),slurm)
stage1 stage2 stage3 stage4: venv
	$(VENV)/bin/pixart-lightning slurm $(CONFIG) --stages $(subst stage,,$@) $(SLURM_ARGS) $(RUN_ARGS)
else ifeq ($(LAUNCH),local)
stage1 stage2 stage3 stage4: venv
	$(VENV)/bin/pixart-lightning run $(CONFIG) --stages $(subst stage,,$@) $(RUN_ARGS)
else
$(error LAUNCH=$(LAUNCH): use local (default) or slurm)
endif

tensorboard: venv
	$(VENV)/bin/tensorboard --logdir runs --host 127.0.0.1 --port 6006

bench: venv
	$(PY) benchmarks/train_step.py

# GPU checks (docs/gpu.md). Here: `make gpu-wheels` fetches the wheels the GPU machine lacks into .whl/ (pinned to
# .venv). There: `make gpu-check` installs them under GPU_SITE and runs every check (reports in $$OUT or
# runs/gpu-check/). `make gpu-check DEVICE=cpu` runs the same checks at tiny sizes.
DEVICE ?= cuda
GPU_SITE ?= /tmp/site
CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
CHECK_ARGS ?=

gpu-wheels: venv
	$(PY) -m pixart_lightning.gpu_check.wheels --dest .whl

gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		$(CHECK_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; \
	fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(CHECK_PYTHON) -m pixart_lightning.gpu_check --device $(DEVICE) $(CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
