# make demo: install into .venv (first use) and run the tiny MAE demo end to end.
# make test: install into .venv (first use) and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUN := runs/mae_tiny_cpu

.PHONY: demo test install clean-demo

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev,medical,video,pathology,remote]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo_shards $(DEMO_RUN)
	$(BIN)/pretrain shards xray "$$($(BIN)/python -c 'import pydicom.data, os; print(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files"))')" runs/demo_shards --samples-per-shard 8
	$(BIN)/pretrain train --cluster clusters/local.yaml --config pretrain/configs/mae_tiny_cpu.yaml
	$(BIN)/pretrain export $(DEMO_RUN) --verify
	@echo "MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(DEMO_RUN)/mlflow.db"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf runs/demo_shards $(DEMO_RUN)
