# Targets: install, test, test-slow, test-all, smoke, bench, lint, demo, eval, ablation.
PYTHON        ?= python
PIP           := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
# Prebuilt torch-scatter/torch-cluster wheels for exactly torch $(TORCH_VERSION)+cpu, when present.
SHARED_WHEELS ?= ../shared/wheels
# Wheels we build from source are kept here (outside the repository) so a second install takes seconds.
WHEEL_CACHE   ?= $(HOME)/.cache/avatar-compress/wheels-torch$(TORCH_VERSION)
FIND_LINKS    := --find-links $(WHEEL_CACHE) $(if $(wildcard $(SHARED_WHEELS)/*.whl),--find-links $(SHARED_WHEELS))
PYTEST        ?= $(PYTHON) -m pytest

.PHONY: install test test-slow test-all smoke bench lint demo eval ablation

install:
	$(PIP) install --quiet "torch==$(TORCH_VERSION)" ninja "setuptools>=68" wheel
	mkdir -p $(WHEEL_CACHE)
	@# torch-scatter / torch-cluster are source-only on PyPI: build against the installed torch
	@# (their setup.py turn ninja off: one file at a time, ~45 min), or reuse the prebuilt or cached
	@# wheels when they are there. --no-deps: their dependency scipy comes with the package below.
	$(PYTHON) -c "import torch_scatter, torch_cluster" 2>/dev/null || { \
	  MAX_JOBS=2 $(PIP) wheel --no-build-isolation --no-deps $(FIND_LINKS) -w $(WHEEL_CACHE) \
	    "torch-scatter>=2.1.2" "torch-cluster>=1.6.3" && \
	  $(PIP) install --no-build-isolation --no-index --no-deps $(FIND_LINKS) torch-scatter torch-cluster; }
	$(PIP) install --quiet --no-build-isolation $(FIND_LINKS) -e ".[fast,tracking,dev]" "torch==$(TORCH_VERSION)"

# pytest exits 5 when it collected no test: that is a failure here, never a green run.
# test: everything but the `slow` tests (a few minutes on 2 cores); test-slow: those (DDP, exact
# resume, the demo pipeline; CI runs both); test-all: both in one session.
test:
	@$(PYTEST) -q -m "not slow" tests; rc=$$?; [ $$rc -ne 5 ] || echo "no tests collected"; [ $$rc -eq 0 ]

test-slow:
	@$(PYTEST) -q -m slow tests; rc=$$?; [ $$rc -ne 5 ] || echo "no tests collected"; [ $$rc -eq 0 ]

test-all:
	@$(PYTEST) -q tests; rc=$$?; [ $$rc -ne 5 ] || echo "no tests collected"; [ $$rc -eq 0 ]

smoke:
	$(PYTEST) -q tests/test_smoke_chain.py

bench:
	$(PYTHON) -m benchmarks.run_all

lint:
	$(PYTHON) -m ruff check models datamodules lightning_modules tests benchmarks

# The whole product at CPU scale on the default video: prepare -> teacher -> distill -> GAR -> test,
# then runs/demo/report.{md,json}, runs/demo/comparison.mp4 and runs/demo/losses.png.
demo: install
	$(PYTHON) -m lightning_modules.demo

# The demo pipeline on carphone and (when ../shared holds it) akiyo: runs/eval/eval.{md,json}, one
# table per subject and their mean; each subject's own report in runs/eval/<subject>/.
eval: install
	$(PYTHON) -m benchmarks.evaluate

# The paper's student ablation on the demo's teacher (run `make demo` first): runs/ablation/ablation.{md,json}
# (about 30 min on 2 CPU cores; the same command takes --overrides and a teacher on a GPU).
ablation: install
	$(PYTHON) -m benchmarks.ablation
