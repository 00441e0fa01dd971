PYTHON ?= python3
PIP = $(PYTHON) -m pip
# Keep a CUDA torch the user already has; otherwise install the pinned CPU build.
TORCH = $(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
# `make demo` installs once: again only when pyproject.toml changes or this Python cannot import qembed.
STAMP = .make/install.stamp

.PHONY: install install-test demo test test-min-versions lint bench docs

install:
	$(TORCH)
	$(PIP) install -e ".[demo,milvus]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

$(STAMP): pyproject.toml
	$(MAKE) install

# The review page is tested in a real headless browser: Debian's chromium, driven by Playwright.
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)
CHROMIUM = command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }

install-test:
	$(TORCH)
	$(CHROMIUM)
	$(PIP) install -e ".[test,demo,milvus,serve,cpu-fast,review,docs]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

demo: $(STAMP)
	@$(PYTHON) -c "import qembed" 2>/dev/null || $(MAKE) install
	$(PYTHON) -m qembed demo $(if $(MODEL),--model $(MODEL),)

test: install-test
	$(PYTHON) -m ruff check qembed tests bench
	$(MAKE) docs
	$(PYTHON) -m pytest -q -n 2 --dist loadfile
	$(MAKE) test-min-versions

# The lowest transformers / tokenizers / huggingface_hub that pyproject.toml declares, in a venv over this
# Python's packages (torch, numpy, ... stay the installed ones), running the model parity tests. The venv is
# kept in .make/; sentence-transformers 5.1 (and the datasets it imports) are the last releases for transformers 4.
MIN_VENV = .make/min-versions
MIN_VERSIONS = $(shell sed -n 's/^ *"\(transformers\|tokenizers\|huggingface_hub\)>=\([0-9.]*\)".*/\1==\2/p' pyproject.toml)
MIN_VERSION_TESTS = tests/test_embedder.py tests/test_reranker.py tests/test_reranker_prefix.py tests/test_models_xlmr.py
# sentence-transformers 5.x strips whitespace from every input (the published recipes and 6.x do not)
MIN_VERSION_SKIP = --deselect tests/test_embedder.py::test_sentence_transformers_agrees_on_tiny_qwen3

test-min-versions:
	@test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q $(MIN_VERSIONS) sentence-transformers==5.1.0
	$(MIN_VENV)/bin/python -m pip install -q --no-deps datasets==4.0.0
	PYTHONPATH=$(CURDIR) $(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_VERSION_TESTS) $(MIN_VERSION_SKIP)

lint:
	$(PYTHON) -m ruff check qembed tests bench

# The documentation site (mkdocs.yml): strict, so a broken link or anchor, a page missing from nav or a docstring
# mkdocstrings cannot render fails the build. `mkdocs serve` to read it while editing.
docs:
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --site-dir site
