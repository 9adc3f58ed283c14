# Targets: install, test, test-slow, test-all, smoke, bench, lint, demo, eval, ablation, player, player-deps.
PYTHON        ?= python
PIP           := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
# Prebuilt torch-scatter/torch-cluster wheels for exactly torch $(TORCH_VERSION)+cpu, when present.
SHARED_WHEELS ?= ../shared/wheels
# Wheels we build from source are kept here (outside the repository) so a second install takes seconds.
WHEEL_CACHE   ?= $(HOME)/.cache/avatar-compress/wheels-torch$(TORCH_VERSION)
FIND_LINKS    := --find-links $(WHEEL_CACHE) $(if $(wildcard $(SHARED_WHEELS)/*.whl),--find-links $(SHARED_WHEELS))
PYTEST        ?= $(PYTHON) -m pytest
# The browser player: its output folder (git-ignored), the pinned npm package files, npm's options.
PLAYER_DIR    ?= player
PLAYER_PAGE   := lightning_modules/player_page
NPM_CI        := npm ci --ignore-scripts --no-audit --no-fund --prefer-offline
# `make player-deps` installs the player's npm package here once, so npm's cache holds it (CI, the slow test).
PLAYER_CACHE  ?= $(HOME)/.cache/avatar-compress/player-npm

.PHONY: install test test-slow test-all smoke bench lint demo eval ablation player player-deps

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

# The browser player (after `make demo`): the demo avatar's ONNX graph, the test frames' codes and a
# reenactment (../shared/data/videos/akiyo_cif.mp4 when present) in $(PLAYER_DIR)/, with onnxruntime-web
# (pinned in $(PLAYER_PAGE)/package.json) installed there by npm. Open it with
# `python -m http.server --directory $(PLAYER_DIR)` and http://localhost:8000. RUN=<gar run>, DRIVER=<video|none>.
player:
	@command -v npm >/dev/null 2>&1 || { echo "make player needs npm, which is not installed (apt-get install -y npm)"; \
	  exit 1; }
	$(PYTHON) -m lightning_modules.player --out $(PLAYER_DIR) $(if $(RUN),--run $(RUN)) $(if $(DRIVER),--driver $(DRIVER))
	$(NPM_CI) --prefix $(PLAYER_DIR)

# What the player's slow test needs (CI runs it before `make test-slow`): chromium (apt, as root) and
# npm, and onnxruntime-web once in $(PLAYER_CACHE) so npm's cache holds it.
player-deps:
	@command -v chromium >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium npm >/dev/null; }
	mkdir -p $(PLAYER_CACHE)
	cp $(PLAYER_PAGE)/package.json $(PLAYER_PAGE)/package-lock.json $(PLAYER_CACHE)/
	$(NPM_CI) --prefix $(PLAYER_CACHE)
