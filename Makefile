# pvqc: the two commands of the README are `make run` and `make test`; both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

# root installs Debian packages directly; anyone else through sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser run serve test lint typecheck unit evaluate bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: these releases lie on local disk; an unpinned one downloads several GB.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[train,dev]"
	touch $(STAMP)

install: $(STAMP)

# the browser tests drive Debian's chromium through Playwright; no browser is ever downloaded
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }

run: install
	$(PY) -m pvqc serve --host $(HOST) --port $(PORT)

serve: run

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy datasets model training serving benchmarks pvqc.py

unit: install
	$(PY) -m pytest

test: install browser lint typecheck unit

evaluate: install
	$(PY) -m training.evaluate --out var/report  # the shipped model: model.card.SHIPPED_MODEL_DIR

bench: install
	$(PY) benchmarks/model_throughput.py
	$(PY) benchmarks/geometry_speed.py
	$(PY) benchmarks/service_throughput.py

clean:
	rm -rf var runs .pytest_cache .mypy_cache .ruff_cache
