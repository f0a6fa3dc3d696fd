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

# Every codec and decoder fuzzed (tests/fuzz): FUZZ_EXAMPLES inputs a target,
# in two processes side by side (the archive readers; the rest); FUZZ_SECONDS,
# if set, caps each target's time (it then stops early and says so). One row a
# target (examples, seconds, rate, peak RSS, outcome) goes to var/fuzz-summary.md;
# each failure's report (with its @reproduce_failure blob) to var/fuzz-findings/,
# its example to var/fuzz-hypothesis (replayed first by the next run).
FUZZ_EXAMPLES ?= 100000
FUZZ_SECONDS ?= 0
FUZZ_TIMEOUT ?= 86400
FUZZ_ENV = AMAVISD_FUZZ=long AMAVISD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) AMAVISD_FUZZ_SECONDS=$(FUZZ_SECONDS)
fuzz: deps
	@mkdir -p var && rm -f var/fuzz-summary.a var/fuzz-summary.b
	@started=$$(date +%s); \
	$(FUZZ_ENV) AMAVISD_FUZZ_SUMMARY=var/fuzz-summary.a timeout $(FUZZ_TIMEOUT) \
		$(PY) -m pytest -p no:cacheprovider -q tests/fuzz/test_fuzz_archives.py $(PYTEST_ARGS) & a=$$!; \
	$(FUZZ_ENV) AMAVISD_FUZZ_SUMMARY=var/fuzz-summary.b timeout $(FUZZ_TIMEOUT) \
		$(PY) -m pytest -p no:cacheprovider -q tests/fuzz \
		--ignore=tests/fuzz/test_fuzz_archives.py $(PYTEST_ARGS) & b=$$!; \
	wait $$a; ra=$$?; wait $$b; rb=$$?; \
	{ echo "# make fuzz, $$(date -u '+%F %H:%M') UTC, $$(( $$(date +%s) - started )) s"; echo; \
	  echo "FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SECONDS=$(FUZZ_SECONDS); exit $$ra/$$rb"; echo; \
	  echo "| target | examples | seconds | examples/s | peak RSS MiB | outcome | detail |"; \
	  echo "|---|---:|---:|---:|---:|---|---|"; \
	  cat var/fuzz-summary.a var/fuzz-summary.b 2>/dev/null; } > var/fuzz-summary.md; \
	rm -f var/fuzz-summary.a var/fuzz-summary.b; cat var/fuzz-summary.md; \
	test $$ra = 0 && test $$rb = 0

# Every ingress at c = 1, 2, 4, 8 against amavisd-new and clamd, memory and latency,
# in one run (root; ~20 min): tables and plots in bench/results/ (bench/run.py).
# BENCH_ARGS=--quick for a ~3 minute smoke run; --write-readme fills README's section.
.PHONY: bench
bench: deps
	$(PY) bench/run.py $(BENCH_ARGS)

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

# Soak (issue 17, not in `make test`): 20,000 messages through the SMTP filter at
# concurrency 8, workers recycling every 200 requests and one SIGKILLed every 3 s;
# every message counted; summary in var/soak-summary.md. E.g. SOAK_ARGS="--messages 2000".
.PHONY: soak
soak: deps
	nice $(PY) -m tests.soak.soak $(SOAK_ARGS)
