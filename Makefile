# vison: two entry points for people (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv system-deps test demo bench clean

# Debian packages the tests need (prometheus + promtool, rabbitmq when absent). Root only; skipped elsewhere.
system-deps:
	@bash deploy/scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: system-deps venv
	$(VPY) -m pytest -q

demo: system-deps venv
	$(VENV)/bin/vison demo

bench: venv
	for b in bench/*.py; do $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
