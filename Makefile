# Two commands for a newcomer: `make demo` (the main job) and `make test`.
# Both create .venv and install what they need. torch is installed first, pinned, because an
# unpinned torch into an empty venv pulls a multi-GB CUDA build; override with
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# pyproject extras to install; .ci/run adds browser (playwright, aiohttp) for tests/test_browser.py
EXTRAS ?= test
PY := $(VENV)/bin/python
comma := ,
STAMP := $(VENV)/.wan22-installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m wan22_core demo --output out/demo.mp4

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
