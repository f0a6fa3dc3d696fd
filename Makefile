# amavisd: `make run` and `make test` are all a fresh Debian 12 machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all deps run test unit integration check lint format sample clean fuzz

all: test

deps:
	PYTHON=$(PYTHON) VENV=$(VENV) sh tools/deps.sh

run: deps
	$(PY) tools/devrun.py

test: deps
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

unit: deps
	$(PY) -m pytest -p no:cacheprovider tests/unit $(PYTEST_ARGS)

integration: deps
	$(PY) -m pytest -p no:cacheprovider tests/integration $(PYTEST_ARGS)

# Hypothesis against the decoders and the AM.PDP parser, many more examples
# than `make test` runs; bounded: FUZZ_EXAMPLES per test, FUZZ_TIMEOUT seconds in all.
FUZZ_EXAMPLES ?= 3000
FUZZ_TIMEOUT ?= 1800
fuzz: deps
	AMAVISD_FUZZ=long AMAVISD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) timeout $(FUZZ_TIMEOUT) \
		$(PY) -m pytest -p no:cacheprovider tests/fuzz $(PYTEST_ARGS)

# The SMTP content filter under load (root): smtp-source through Postfix, ours and
# Debian's amavisd-new in the same run (bench/smtp_throughput.py).
.PHONY: bench-smtp
bench-smtp: deps
	$(PY) bench/smtp_throughput.py $(BENCH_ARGS)

check: deps
	$(PY) tools/check.py

lint: deps
	$(VENV)/bin/ruff check amavisd amavisd_client tests bench tools

sample: deps
	$(PY) -m amavisd check-config --sample > etc/amavisd.toml

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .ruff_cache .hypothesis

# Milter throughput through a private Postfix (root): no milter, ours, Debian's C one.
.PHONY: bench-milter
bench-milter: deps
	$(PY) bench/milter_throughput.py $(BENCH_ARGS)
