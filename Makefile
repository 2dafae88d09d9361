# cad-node: the two commands a new user runs are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONFIG ?= config/cad-node.yaml
# Debian packages the test-suite drives as real peers (never mocked).
# systemd ships /usr/bin/systemd-analyze (tests/unit/test_deploy.py verifies the units);
# chromium + chromium-driver drive the browser tests (selenium); orthanc-dicomweb serves
# DICOMweb to OHIF in tests/system/test_viewer_ohif.py; postgresql: tests/system/test_scaleout.py
# runs initdb + pg_ctl from /usr/lib/postgresql/<ver>/bin.
PEER_PKGS := dcmtk dicom3tools orthanc orthanc-dicomweb redis-server systemd chromium chromium-driver postgresql
PEER_BINS := /usr/bin/storescu /usr/bin/echoscu /usr/bin/dsrdump /usr/bin/dciodvfy /usr/sbin/Orthanc /usr/bin/redis-server /usr/bin/systemd-analyze /usr/bin/chromium /usr/bin/chromedriver /usr/bin/unshare \
	/usr/share/orthanc/plugins/libOrthancDicomWeb.so
# The browser test's OHIF: the built @ohif/app from npm, packed into a cache outside git
# (tests/system/viewer_peers.py unpacks it there and reuses it across runs).
TEST_CACHE ?= $(if $(CAD_NODE_TEST_CACHE),$(CAD_NODE_TEST_CACHE),$(HOME)/.cache/cad-node-test)
OHIF_VERSION := 3.13.2
OHIF_TARBALL := $(TEST_CACHE)/ohif/ohif-app-$(OHIF_VERSION).tgz
PYTEST_ARGS ?=

.PHONY: venv peers ohif serve test lint typecheck bench fuzz soak clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch from the local wheel; GPU hosts: see README "GPU hosts".
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

peers:
	@missing=0; for b in $(PEER_BINS); do test -x $$b || missing=1; done; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing=1; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(PEER_PKGS); \
	  else \
	    echo "missing test peers; run: sudo apt-get install $(PEER_PKGS)" >&2; exit 1; \
	  fi; \
	fi

ohif: $(OHIF_TARBALL)

$(OHIF_TARBALL):
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm; } || \
	  { echo "npm is missing; run: sudo apt-get install npm" >&2; exit 1; }
	mkdir -p $(dir $@)
	cd $(dir $@) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	tar -tzf $@ package/dist/index.html >/dev/null

serve: venv
	$(VENV)/bin/cad-node serve --config $(CONFIG)

# pytest exit code 5 ("no tests collected") is a failure here, never a pass.
test: venv peers ohif
	$(VENV)/bin/ruff check cad_node trainer tests bench
	$(VENV)/bin/mypy --strict cad_node trainer
	$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint:
	$(VENV)/bin/ruff check cad_node trainer tests bench

typecheck:
	$(VENV)/bin/mypy --strict cad_node trainer

# Figures go to docs/benchmarks.md by hand, with the command that made them.
bench: venv peers
	$(PY) bench/ingest.py --rounds 3
	$(PY) bench/ct_pipeline.py
	$(PY) bench/cxr_pipeline.py --repeats 10
	$(PY) bench/results_build.py --repeats 5
	$(PY) bench/turnaround.py --repeat 2
	$(PY) bench/prepare_lidc.py --repeat 3
	$(PY) bench/train_throughput.py
	$(PY) bench/edge_probe.py --connections 3

# 20 concurrent senders for 10 minutes against `cad-node serve` with its embedded worker.
soak: venv peers
	$(PY) bench/soak.py --senders 20 --duration 600

# The long fuzz campaign of the network edge (make test runs a short one):
# 3000 examples for each of the 4 hypothesis targets = 12 000 cases.
FUZZ_EXAMPLES ?= 3000
fuzz: venv peers
	CAD_NODE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest tests/integration/test_fuzz_edge.py -q --durations=10

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
