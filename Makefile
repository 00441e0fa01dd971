PYTHON ?= python3
PIP = $(PYTHON) -m pip
# Keep a CUDA torch the user already has; otherwise install the pinned CPU build.
TORCH = $(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
# `make demo` installs once: again only when pyproject.toml changes or this Python cannot import qembed.
STAMP = .make/install.stamp

.PHONY: install install-test demo test lint bench

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
	$(PIP) install -e ".[test,demo,milvus,serve,cpu-fast,review]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

demo: $(STAMP)
	@$(PYTHON) -c "import qembed" 2>/dev/null || $(MAKE) install
	$(PYTHON) -m qembed demo $(if $(MODEL),--model $(MODEL),)

test: install-test
	$(PYTHON) -m ruff check qembed tests bench
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check qembed tests bench
