"""50 MiB messages through the whole pipeline, with a real clamd, in a fresh
process each: the worker's peak RSS grows by far less than the message, in
every shape (short text lines, a base64 attachment, quoted-printable,
uuencode), and the verdicts are the ones a small message gets (EICAR at the
end of the text, inside the attachment, in a zip inside the attachment);
and a message of a few MiB, whose parts are small enough to be held in
memory, costs at most twice its size (issue 16's target).

The message is handed over as the SMTP filter hands it (a nameless spool
file of ours, mapped in place) and as AM.PDP does (a client's file, copied
before it is mapped). The growth is the child's VmHWM after the message less
its VmRSS before it, the high-water mark reset to that (clear_refs) after a
small warm-up message (imports, clamd session).

    .venv/bin/python -m tests.integration.test_big_messages   (prints the table)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amavisd.testing.eicar import EICAR
from tests.rigs import shapes

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SIZE = 50 * MiB
BOUND_MIB = 16  # peak RSS growth allowed for a 50 MiB message, any shape
TARGET = 2.0  # issue 16: a message costs at most twice its size, whatever its shape


def text_lines(tail: bytes = b"") -> bytes:
    """76 base64 digits a line: a text, and base64 without headers too."""
    return shapes.bare_base64(SIZE, tail)


def base64_attachment(tail: bytes = b"") -> bytes:
    return shapes.base64_attachment(SIZE, tail)


SHAPES = {
    "text lines": text_lines,
    "base64 attachment": base64_attachment,
    "quoted-printable": lambda: shapes.quoted_printable(SIZE),
    "uuencode": lambda: shapes.uuencoded(SIZE),
}
INFECTED = {
    "EICAR after 50 MiB of text": lambda: text_lines(EICAR + b"\r\n"),
    "EICAR at the end of a base64 attachment": lambda: base64_attachment(EICAR),
    # the zip reader held the member's mapped pages (+39 MiB); now read from the file
    "EICAR in a zip in a base64 attachment": lambda: shapes.zip_in_attachment(SIZE, EICAR),
    "EICAR at the end of a quoted-printable body": lambda: shapes.quoted_printable(SIZE, EICAR),
    "EICAR at the end of a uuencoded block": lambda: shapes.uuencoded(SIZE, EICAR),
}
# Shapes that once cost more than twice their size at 5-7 MB: a part small
# enough to be held was sliced out of the mapping (its pages faulted in and
# kept) and, for base64, copied once more before it was decoded (the 6.755 MB
# attachment of `make bench`: +17.4 MiB, 2.70x).
HELD = {
    "base64 attachment": shapes.base64_attachment,
    "one long line": shapes.long_line,
    "short lines": shapes.text_lines,
}

# Runs in a fresh interpreter: argv = clamd address, message file, "spool", "file" or
# "server" (AM.PDP delivery_care_of=server: a private copy scanned, then forwarded
# to the next hop in argv[4]).
CHILD = r"""
import json, os, sys
from amavisd import config as configuration
from amavisd.envelope import Envelope, Job
from amavisd.pipeline import Pipeline
from amavisd.protocol.server_delivery import ServerDelivery, Snapshot

address, path, how = sys.argv[1:4]
settings = {"clamd": address, "max_message_size": 64 << 20, "clamd_max_stream": 64 << 20,
            "quarantine_dir": os.path.join(os.path.dirname(path), "quarantine")}
if how == "server":
    settings["forward_method"] = sys.argv[4]
config = configuration.load(None, settings)
pipeline = Pipeline(config)
envelope = Envelope(sender="a@example.test", recipients=["b@example.test"])

def job(path, log_id):
    if how == "file":  # AM.PDP: the client's file, by its path
        return Job(log_id=log_id, mail_path=path, envelope=envelope)
    if how == "server":
        return Job(log_id=log_id, mail_path=path, envelope=envelope,
                   mail_fd=os.open(path, os.O_RDONLY))
    fd = os.open(os.path.dirname(path), os.O_TMPFILE | os.O_RDWR, 0o600)  # the SMTP spool
    with open(path, "rb") as src:
        while chunk := src.read(1 << 20):
            os.write(fd, chunk)
    return Job(log_id=log_id, mail_path="(spool)", mail_fd=fd, envelope=envelope)

small = path + ".small"
with open(small, "wb") as fh:
    fh.write(b"Subject: warm-up\n\nhello\n")
pipeline.process(job(small, "w-1"))
big = job(path, "b-1")

def status(name):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(name + ":"))

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # VmHWM := VmRSS
before = status("VmRSS")
answer = None
if how == "server":
    with Snapshot(big.mail_fd, 64 << 20) as snapshot:
        big = Job(log_id="b-1", mail_path=path, envelope=envelope, mail_fd=snapshot.fd)
        result = pipeline.process(big)
        with snapshot.open() as source:
            answer = ServerDelivery(config).deliver(result, envelope, source, snapshot.size).smtp
else:
    result = pipeline.process(big)
after = status("VmHWM")
print(json.dumps({"verdict": result.verdict, "viruses": result.viruses,
                  "unchecked": [str(u) for u in result.unchecked],
                  "tempfail": result.tempfail_reason, "size": result.size,
                  "before_kib": before, "growth_kib": after - before, "answer": answer,
                  "quarantine_id": result.quarantine_id}))
"""


def run_child(address: str, message: bytes, directory: Path, how: str = "spool",
              *extra: str) -> dict:
    path = directory / "big.eml"
    path.write_bytes(message)
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, address, str(path), how, *extra],
                              capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).resolve().parents[2])
    finally:
        path.unlink()
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", SHAPES)
def test_a_50_mib_message_costs_far_less_than_its_size(shape, clamd_nodecomp, tmp_path):
    message = SHAPES[shape]()
    assert len(message) > 49 * MiB
    out = run_child(clamd_nodecomp.address, message, tmp_path)
    growth = out["growth_kib"] / 1024
    print(f"\n{shape}: {len(message) / MiB:.1f} MiB, peak RSS +{growth:.1f} MiB, {out['verdict']}")
    assert out["verdict"] == "CLEAN", out
    assert out["size"] == len(message)
    assert growth < BOUND_MIB, f"{shape}: peak RSS grew by {growth:.1f} MiB"


@pytest.mark.parametrize("case", INFECTED)
def test_eicar_inside_a_50_mib_message_is_found(case, clamd_nodecomp, tmp_path):
    message = INFECTED[case]()
    out = run_child(clamd_nodecomp.address, message, tmp_path)
    assert out["verdict"] == "INFECTED", out
    assert any("Eicar" in v or "EICAR" in v.upper() for v in out["viruses"]), out
    # quarantined from the mapping, byte for byte
    [kept] = [p for p in (tmp_path / "quarantine").iterdir() if not p.name.endswith(".json")]
    assert out["quarantine_id"].endswith(kept.name.split("-", 1)[1]), (out, kept.name)
    assert kept.stat().st_size == len(message) and kept.read_bytes() == message
    assert out["growth_kib"] / 1024 < BOUND_MIB, out


@pytest.mark.parametrize("shape", HELD)
def test_a_message_of_a_few_mib_costs_at_most_twice_its_size(shape, clamd_nodecomp, tmp_path):
    """Below the spill threshold its part is held in memory: read from the
    file (pread) or decoded a window at a time, never faulted in."""
    message = HELD[shape](6_755_000)
    out = run_child(clamd_nodecomp.address, message, tmp_path, how="file")
    ratio = out["growth_kib"] * 1024 / len(message)
    print(f"\n{shape}: {len(message) / 1e6:.2f} MB, peak RSS +{out['growth_kib'] / 1024:.1f} "
          f"MiB, {ratio:.2f}x")
    assert out["verdict"] == "CLEAN", out
    assert ratio <= TARGET, f"{shape}: {ratio:.2f} x its size"


def test_a_clients_file_is_copied_then_mapped(clamd_nodecomp, tmp_path):
    """AM.PDP: the client's file may be cut short under a mapping (SIGBUS):
    it is copied into a nameless file of ours first, at no cost in RSS."""
    out = run_child(clamd_nodecomp.address, base64_attachment(), tmp_path, how="file")
    assert out["verdict"] == "CLEAN", out
    assert out["growth_kib"] / 1024 < BOUND_MIB, out


def test_delivery_care_of_server_forwards_a_50_mib_message_from_its_copy(clamd_nodecomp,
                                                                        tmp_path, sink):
    """AM.PDP delivery_care_of=server: the private copy is made in the kernel,
    scanned mapped, and forwarded from the file with our header edits in
    front: the worker never holds the message."""
    message = text_lines()
    host, port = sink.address
    out = run_child(clamd_nodecomp.address, message, tmp_path, "server",
                    f"smtp:[{host}]:{port}")
    print(f"\ndelivery_care_of=server, 50 MiB: peak RSS +{out['growth_kib'] / 1024:.1f} MiB")
    assert out["verdict"] == "CLEAN" and out["answer"] == "250", out
    [got] = sink.wait(1)
    body = message[message.index(b"\r\n\r\n"):]
    assert got.data.endswith(body) and b"X-Virus-Scanned:" in got.data[:4096]
    assert got.data[:4096].count(b"Received: from") == 1  # ours, on top
    assert out["growth_kib"] / 1024 < BOUND_MIB, out


def main() -> None:
    """Print peak RSS growth per shape (needs a clamd: AMAVISD_CLAMD=unix:/path)."""
    import tempfile

    address = os.environ["AMAVISD_CLAMD"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in {**SHAPES, **INFECTED}.items():
            message = build()
            out = run_child(address, message, Path(tmp))
            print(f"| {name} | {len(message) / MiB:.1f} | +{out['growth_kib'] / 1024:.1f} | "
                  f"{out['verdict']} |")


if __name__ == "__main__":
    main()
