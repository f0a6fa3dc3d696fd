"""What policy banks cost per message: Pipeline.process with and without banks.

Rows, each on the same clean message through the same in-process Pipeline
and a private real clamd (test signatures, decoding off):

- none: no bank chosen (the config as written);
- 2 banks: the client names two banks (`policy_bank=A,B`), each overriding
  destinies, banned rules and the header text;
- mynets+2: the client address is in mynetworks (the built-in MYNETS bank)
  and it names the same two banks, with a recipient_policy bank for one of
  two recipients and a bypass list to look up;
- choose only: the bank choice and per-recipient lookups alone (no message),
  to show what they add to a message's time.

Combinations are built once and cached, so after the first message a bank
costs a few dict lookups. Rows take turns each run; the best run counts.

    .venv/bin/python bench/policy_banks.py [-n 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from amavisd import config as configuration
from amavisd.envelope import Envelope, Job
from amavisd.pipeline import Pipeline
from amavisd.testing.clamd import ClamdInstance, skip_reason
from amavisd.testing.messages import clean_message

BANKS = {
    "A": {"virus_destiny": "reject", "banned_rules": ["deny name ~ \\.exe$"]},
    "B": {"banned_destiny": "reject", "x_header_line": "checked at {myhostname}"},
    "R": {"unchecked_destiny": "tempfail"},
}
ROWS = {
    "none": Envelope(sender="a@example.org", recipients=["b@example.net"],
                     client_address="192.0.2.1"),
    "2 banks": Envelope(sender="a@example.org", recipients=["b@example.net"],
                        client_address="192.0.2.1", policy_bank="A,B"),
    "mynets+2": Envelope(sender="a@example.org", recipients=["b@example.net", "c@r.example"],
                         client_address="10.1.2.3", policy_bank="A,B"),
}


def run_row(pipeline: Pipeline, path: Path, envelope: Envelope, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        result = pipeline.process(Job(log_id=f"b-{i}", mail_path=str(path), envelope=envelope))
        assert result.verdict == "CLEAN", result.summary()
    return n / (time.perf_counter() - started)


def run_choice(pipeline: Pipeline, envelope: Envelope, n: int) -> float:
    policies = pipeline.policies
    job = Job(log_id="c", mail_path="-", envelope=envelope)
    started = time.perf_counter()
    for _ in range(n):
        policy = policies.for_job(job)
        policies.recipient_checks(policy, envelope.recipients)
    return (time.perf_counter() - started) / n * 1e6  # microseconds a message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="messages a row a run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    reason = skip_reason()
    if reason:
        raise SystemExit(reason)
    logging.disable(logging.INFO)  # the log line is not what is measured
    base = Path(tempfile.mkdtemp(prefix="bnk", dir="/tmp"))
    base.chmod(0o755)
    try:
        with ClamdInstance(base / "clamd", mode="nodecomp") as clamd:
            values = {"clamd": clamd.address, "backup_scanners": [], "quarantine_dir": "",
                      "notify_method": "smtp:127.0.0.1:9", "myhostname": "gw.example.org",
                      "recipient_policy": ["r.example=R"],
                      "bypass_banned_checks": ["nobody@example.net"], "policy_banks": BANKS}
            pipeline = Pipeline(configuration.load(None, values))
            path = base / "clean.eml"
            path.write_bytes(clean_message())
            best: dict[str, float] = {}
            for envelope in ROWS.values():  # warm up: build the combinations
                run_row(pipeline, path, envelope, 50)
            for _ in range(args.runs):
                for name, envelope in ROWS.items():
                    best[name] = max(best.get(name, 0.0), run_row(pipeline, path, envelope,
                                                                  args.n))
            choice = min(run_choice(pipeline, ROWS["mynets+2"], 100_000) for _ in range(3))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"| Row | messages/s (best of {args.runs} x {args.n}) | vs none |")
    print("|:---|---:|---:|")
    for name, rate in best.items():
        print(f"| {name} | {rate:,.0f} | {rate / best['none']:.1%} |")
    print(f"\nBank choice and recipient lookups alone (mynets+2): {choice:.2f} µs a message.")


if __name__ == "__main__":
    main()
