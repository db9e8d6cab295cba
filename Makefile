# ctrlab set-up and everyday commands. Every install step lives here so a fresh clone needs nothing else.
#
#   make quickstart     create .venv, install, train recipes/quickstart.yaml on synthetic data
#   make test           create .venv, install, run ruff, mypy and the test suite
#
# Variables (override on the command line, e.g. `make test PYTHON=python3.12`):
#   PYTHON        interpreter used to create .venv                 (default python3)
#   DEVICE        cpu | cuda: which torch / fbgemm build to install (default cpu)
#   TORCH_INDEX   extra index for torch wheels, e.g. https://download.pytorch.org/whl/cpu
#                 (CPU machines without a local torch wheel) or https://download.pytorch.org/whl/cu128 (GPU)
#   FBGEMM        with DEVICE=cuda: the fbgemm-gpu requirement matching your torch/CUDA (default fbgemm-gpu)

PYTHON ?= python3
DEVICE ?= cpu
TORCH_VERSION ?= 2.13.0
TORCHREC_VERSION ?= 1.9.2
FBGEMM_CPU_VERSION ?= 1.8.0
TORCH_INDEX ?=
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ctrlab-installed-$(DEVICE)
CTRLAB_DATA_DIR ?= $(if $(wildcard ../shared/datasets),$(abspath ../shared/datasets),)
export CTRLAB_DATA_DIR

ifeq ($(DEVICE),cuda)
  FBGEMM ?= fbgemm-gpu
else
  FBGEMM := fbgemm-gpu-cpu==$(FBGEMM_CPU_VERSION)
endif
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: install services quickstart test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first so nothing later can pull another build; torchrec goes in with --no-deps
# because its declared dependency on fbgemm-gpu is the CUDA build, which fails on a CPU-only machine.
$(STAMP): pyproject.toml setup.py Makefile | $(PY)
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(TORCH_INDEX_ARG)
	$(PIP) install -q "$(FBGEMM)" $(TORCH_INDEX_ARG) "torch==$(TORCH_VERSION)"
	$(PIP) install -q tensordict torchmetrics tqdm pyre-extensions "torch==$(TORCH_VERSION)"
	$(PIP) install -q --no-deps "torchrec==$(TORCHREC_VERSION)"
	$(PIP) install -q -e ".[track,dev]" "torch==$(TORCH_VERSION)"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/ctrlab train recipes/quickstart.yaml

# The tests start a real PostgreSQL server (Debian's package) and an mlflow server on loopback. Install the
# package when it is missing and we can (root with apt); otherwise those tests skip (and fail under CI).
services:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing PostgreSQL (Debian package) for the service tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "PostgreSQL not installed: the service tests will skip (apt-get install postgresql)"; fi

test: $(STAMP) services
	$(VENV)/bin/ruff check ctrlab tests benchmarks
	$(VENV)/bin/mypy ctrlab
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
