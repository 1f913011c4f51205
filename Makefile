# Quick start:  make demo   (set up, build a cache over a real gallery, query it)
#               make test   (set up, run the tests)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
# Offline the weights come from ../shared/weights; online, models not found there are downloaded.
export LOOKALIKE_WEIGHTS ?= $(SHARED)/weights

.PHONY: setup demo test clean
setup: $(VENV)/.installed

# Every extra, with the tested torch/torchvision pair (constraints.txt).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,ray,crop,eval,train,milvus]'
	$(PY) -c "import torchvision.ops, timm, open_clip, faiss, ultralytics, onnxruntime, fastapi, uvicorn, ray.data, \
		matplotlib, sklearn, pytorch_metric_learning, pymilvus, milvus_lite"
	touch $@

demo: setup
	$(PY) scripts/prepare_demo.py --zip $(SHARED)/data/caltech101-22.zip --out .demo
	$(PY) cli.py build-cache --gallery .demo/gallery --out .demo/cache --classifier mobilenetv2 --embedder mobilenetv2
	$(PY) cli.py query .demo/queries/airplanes.jpg .demo/queries/pizza.jpg .demo/queries/llama.jpg \
		--cache .demo/cache --sheet .demo/sheet.png

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf .demo .pytest_cache
