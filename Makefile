PYTHON ?= python3
PIP = $(PYTHON) -m pip
# Keep a CUDA torch the user already has; otherwise install the pinned CPU build.
TORCH = $(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0

.PHONY: install install-test demo test lint bench

install:
	$(TORCH)
	$(PIP) install -e ".[demo,milvus]"

install-test:
	$(TORCH)
	$(PIP) install -e ".[test,demo,milvus,serve]"

demo: install
	$(PYTHON) -m qembed demo $(if $(MODEL),--model $(MODEL),)

test: install-test
	$(PYTHON) -m ruff check qembed tests bench
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check qembed tests bench
