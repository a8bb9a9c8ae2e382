# Every target bootstraps .venv on a fresh machine: torch==2.13.0 first (the CPU wheel on disk),
# then the package with its dev extras, so a bare `torch` requirement never pulls a CUDA build.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test test-slow bench bench-serve bench-grpo lint venv

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) -m nanoseek.cli demo

test: $(VENV_STAMP)
	$(PY) -m pytest tests

test-slow: $(VENV_STAMP)
	$(PY) -m pytest tests -m slow

bench: $(VENV_STAMP)
	$(PY) bench/model_throughput.py
	$(PY) bench/generate.py

bench-serve: $(VENV_STAMP)
	$(PY) bench/serve_load.py

# needs a pretrained run for a meaningful reward comparison: make bench-grpo INIT=runs/demo/base
bench-grpo: $(VENV_STAMP)
	$(PY) bench/grpo_vs_trl.py $(if $(INIT),--init $(INIT),)

lint: $(VENV_STAMP)
	$(PY) -m ruff check nanoseek tests bench
