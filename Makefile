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
# side by side: the archive and decoder targets under the direct mutation
# driver (tests/fuzz/direct.py, a child a target, FUZZ_JOBS at a time), the
# codec targets under hypothesis (one process). On an idle 2-core machine the
# driver's 24 targets take ~4 CPU-hours at 100,000 (freeze ~55 min and sfx
# ~40 min of it), the whole run ~2.5-3 h. FUZZ_SECONDS, if set, caps each target's time (it
# then stops early and says so). One row a target (examples, seconds, rate,
# peak RSS, outcome) goes to var/fuzz-summary.md; each finding to
# var/fuzz-findings/: the driver's as the input bytes and a .txt with the line
# that replays it, hypothesis' as its report with the @reproduce_failure blob
# (its example also in var/fuzz-hypothesis, replayed first by the next run).
# `make fuzz-mutate` runs the driver alone, FUZZ_JOBS targets at a time;
# FUZZ_TARGETS names some of its targets (`$(PY) -m tests.fuzz.direct list`).
FUZZ_EXAMPLES ?= 100000
FUZZ_SECONDS ?= 0
FUZZ_TIMEOUT ?= 86400
FUZZ_JOBS ?= 2
FUZZ_ENV = AMAVISD_FUZZ=long AMAVISD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) AMAVISD_FUZZ_SECONDS=$(FUZZ_SECONDS)
FUZZ_DIRECT = $(PY) -m tests.fuzz.direct run -n $(FUZZ_EXAMPLES) --seconds $(FUZZ_SECONDS)
FUZZ_HEAD = echo "| target | examples | seconds | examples/s | peak RSS MiB | outcome | detail |"; \
	echo "|---|---:|---:|---:|---:|---|---|"
.PHONY: fuzz-mutate
fuzz: deps
	@mkdir -p var && rm -f var/fuzz-summary.a var/fuzz-summary.b
	@started=$$(date +%s); \
	timeout $(FUZZ_TIMEOUT) $(FUZZ_DIRECT) -j $(FUZZ_JOBS) --summary var/fuzz-summary.a $(FUZZ_TARGETS) \
		& a=$$!; \
	$(FUZZ_ENV) AMAVISD_FUZZ_SUMMARY=var/fuzz-summary.b timeout $(FUZZ_TIMEOUT) \
		$(PY) -m pytest -p no:cacheprovider -q tests/fuzz --ignore=tests/fuzz/test_fuzz_archives.py \
		--ignore=tests/fuzz/test_fuzz_decoders.py $(PYTEST_ARGS) & b=$$!; \
	wait $$a; ra=$$?; wait $$b; rb=$$?; \
	{ echo "# make fuzz, $$(date -u '+%F %H:%M') UTC, $$(( $$(date +%s) - started )) s"; echo; \
	  echo "FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SECONDS=$(FUZZ_SECONDS); exit $$ra/$$rb"; echo; \
	  $(FUZZ_HEAD); cat var/fuzz-summary.a var/fuzz-summary.b 2>/dev/null; } > var/fuzz-summary.md; \
	rm -f var/fuzz-summary.a var/fuzz-summary.b; cat var/fuzz-summary.md; \
	test $$ra = 0 && test $$rb = 0

fuzz-mutate: deps
	@mkdir -p var && rm -f var/fuzz-summary.a
	@started=$$(date +%s); \
	timeout $(FUZZ_TIMEOUT) $(FUZZ_DIRECT) -j $(FUZZ_JOBS) --summary var/fuzz-summary.a \
		$(FUZZ_TARGETS); ra=$$?; \
	{ echo "# make fuzz-mutate, $$(date -u '+%F %H:%M') UTC, $$(( $$(date +%s) - started )) s"; \
	  echo; echo "FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SECONDS=$(FUZZ_SECONDS); exit $$ra"; echo; \
	  $(FUZZ_HEAD); cat var/fuzz-summary.a; } > var/fuzz-summary.md; \
	rm -f var/fuzz-summary.a; cat var/fuzz-summary.md; test $$ra = 0

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
