# pyimgcrypt: `make demo` runs the main job for real, `make test` runs every test.
# Both install what they need (Debian packages and a virtualenv in .venv) first; run as root.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv openssl containerd runc skopeo docker-registry umoci \
	busybox-static ca-certificates time

.PHONY: deps venv lint unit integration test demo package bench clean

deps: venv
	@bash integration/install-deps.sh $(APT_PACKAGES)

venv: $(VENV)/.installed

# gcc and the Python headers compile decoder/_sha256pair.c (two SHA-256 streams at once); pip
# would otherwise skip it quietly and the decoder would hash more slowly.
BUILD_PACKAGES := python3 python3-venv python3-dev gcc libc6-dev

$(VENV)/.installed: pyproject.toml decoder/_sha256pair.c
	@bash integration/install-deps.sh $(BUILD_PACKAGES)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,package]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check decoder tests integration bench
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q tests

integration: deps
	$(VENV)/bin/pytest -q integration

test: deps lint
	$(VENV)/bin/pytest -v tests integration

demo: deps
	$(PY) integration/demo.py

package: venv
	bash packaging/build.sh

# Benchmarks (not part of `make test`): regenerates docs/performance.md and docs/throughput.png.
# `make bench BENCH_ARGS=--quick` for a short development run; `python -m bench --help`.
bench: deps
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf build dist $(VENV) *.egg-info
