# The two commands in README.md:
#   make train   set up .venv and run the main job on the embedded default
#   make test    set up .venv and run the test suite (CI runs it, then `make test-rehearsal`)
# and after `make train`: `make serve` (the champion over HTTP), `make ui` (MLflow's UI)
# bash: the postgresql target uses compgen
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU torch: on a machine without CUDA, torch is installed on its own, pinned, before
# anything else, so that no dependency drags in the multi-GB CUDA build. Set
# TORCH_INDEX_URL to PyTorch's CPU wheel index where PyPI's default build is CUDA.
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?=
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)

.PHONY: setup postgresql promtool sshd train serve ui test test-fast rehearsal test-rehearsal bench lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
ifeq ($(HAS_CUDA),)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
endif
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The MLflow server tests and the rehearsal start a real PostgreSQL (tests/services.py).
# Debian keeps initdb in /usr/lib/postgresql/<version>/bin, off PATH. Installed here when
# missing and we are root with apt-get (CI); otherwise the message says what to install.
postgresql:
	@command -v initdb > /dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' > /dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql > /dev/null; } || \
	  { echo "PostgreSQL is needed by the tests: install Debian's postgresql package (sudo apt-get install postgresql)" >&2; exit 1; }

# The alerts' unit tests run `promtool` (tests/test_platform_files.py): Debian's prometheus
# package ships it. Installed the same way as PostgreSQL above.
promtool:
	@command -v promtool > /dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus > /dev/null; } || \
	  { echo "promtool is needed by the tests (the alerts' unit tests): install Debian's prometheus package (sudo apt-get install prometheus)" >&2; exit 1; }

# The cluster rehearsal's machines are network namespaces that run sshd, reached by `ray up` with
# ssh and rsync (tests/netns_hosts.py): Debian's openssh-server, openssh-client, rsync and
# iproute2, installed the same way as PostgreSQL above. (Where the init system allows it,
# Debian's package also starts its ssh service; the rehearsal never uses that one.)
sshd:
	@{ test -x /usr/sbin/sshd && command -v ssh > /dev/null && command -v rsync > /dev/null && command -v ip > /dev/null; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server openssh-client rsync iproute2 > /dev/null; } || \
	  { echo "the cluster rehearsal needs sshd, ssh, rsync and ip: install Debian's openssh-server, openssh-client, rsync and iproute2 (sudo apt-get install openssh-server openssh-client rsync iproute2)" >&2; exit 1; }

train: setup
	$(BIN)/python -m pipelines.train_imdb --data sample --epochs 1 --max-length 128 --batch-size 16 $(ARGS)

# the champion that `make train` registered, behind http://127.0.0.1:$(PORT) (Ctrl-C stops)
PORT ?= 8000
serve: setup
	$(BIN)/python -m serve.app --port $(PORT) $(ARGS)

# MLflow's UI on the embedded store that train and serve use ($$PLATFORM_STORAGE, else ~/.cache/imdb-platform)
UI_PORT ?= 5000
ui: setup
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(UI_PORT) --backend-store-uri \
	  "$$($(BIN)/python -c 'from pipelines.core import storage; from pipelines.tracking import store_uri; print(store_uri.local_store(storage.default_storage())[0])')"

# the suite without the cluster rehearsal (below): CI runs both (.ci/run)
test: setup postgresql promtool
	$(BIN)/python -m pytest -m "not rehearsal" $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

# the whole cluster on one machine, as root: `ray up platform/cluster/onprem.yaml` on three SSH
# hosts (network namespaces) with nothing shared but S3 (moto), PostgreSQL and the MLflow server;
# Prometheus watches it (tests/scenarios/cluster_rehearsal.py)
rehearsal: setup postgresql promtool sshd
	$(BIN)/python tests/scenarios/cluster_rehearsal.py "$$(mktemp -d -t rehearsal-XXXXXX)"

# the same through its test (tests/test_multinode.py), with the test's assertions: what CI runs after `make test`
test-rehearsal: setup postgresql promtool sshd
	$(BIN)/python -m pytest -m rehearsal $(ARGS)

bench: setup
	$(BIN)/python bench/train_overhead.py

lock: setup
	$(BIN)/pip freeze --all --exclude pip --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/' > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
