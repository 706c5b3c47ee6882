# make demo: install into .venv (first use) and run the tiny MAE demo end to end.
# make test: install into .venv (first use), set up what the tests need from the machine (Debian packages of
#            the services they start, where this user can install them; DeepSpeed's ops built once into the
#            torch extensions cache), then run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUN := runs/mae_tiny_cpu

MIX := runs/demo_mixture

.PHONY: demo demo-mixture test install clean-demo gpu-bundle gpu-check

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev,medical,video,pathology,remote,gpu]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo_shards $(DEMO_RUN)
	$(BIN)/pretrain shards xray "$$($(BIN)/python -c 'import pydicom.data, os; print(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files"))')" runs/demo_shards --samples-per-shard 8
	$(BIN)/pretrain train --cluster clusters/local.yaml --config pretrain/configs/mae_tiny_cpu.yaml
	$(BIN)/pretrain export $(DEMO_RUN) --verify
	@echo "MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(DEMO_RUN)/mlflow.db"

# The second demo: one ViT pretrained on X-rays, CT (2.5D slabs) and pathology tiles together.
demo-mixture: $(STAMP)
	rm -rf $(MIX) runs/mae_mixture_cpu
	$(BIN)/pretrain shards xray "$$($(BIN)/python -c 'import pydicom.data, os; print(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files"))')" $(MIX)/xray --samples-per-shard 8 --no-progress
	$(BIN)/python -m data_pipeline.synthetic ct $(MIX)/raw_ct --count 8
	$(BIN)/pretrain shards ct $(MIX)/raw_ct $(MIX)/ct --samples-per-shard 4 --no-progress
	$(BIN)/python -m data_pipeline.synthetic slides $(MIX)/raw_slides --count 3
	$(BIN)/pretrain shards wsi $(MIX)/raw_slides $(MIX)/pathology --mpp 0.5 --tile-size 64 --samples-per-shard 16 --no-progress
	$(BIN)/pretrain train --cluster clusters/local.yaml --config pretrain/configs/mae_mixture_cpu.yaml
	$(BIN)/pretrain export runs/mae_mixture_cpu --verify --stem ct

test: $(STAMP)
	$(BIN)/python -m tests.system_deps
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile tests

# The GPU acceptance run. gpu-bundle (here, with a package registry): the wheels the GPU machine lacks, for its
# Python 3.12, into gpu_bundle/, checked offline to resolve beside its preinstalled packages. gpu-check (there,
# offline, with the machine's own python3 and torch): installs them, runs every GPU-only check, writes
# benchmarks/results/gpu_check.json (and $$OUT/gpu_check.json); without a GPU it prints its plan and exits 0.
gpu-bundle: $(STAMP)
	$(BIN)/python benchmarks/gpu_bundle.py --out gpu_bundle

GPU_PYTHON ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

clean-demo:
	rm -rf runs/demo_shards $(DEMO_RUN) $(MIX) runs/mae_mixture_cpu
