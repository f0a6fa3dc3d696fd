"""How parts should reach clamd: measured, not assumed (issue 5).

Runs a private real clamd (the test signature DB, archive/mail decoding off)
and scans the same N parts of a message four ways, median of several rounds:

- instream-session: our ClamdScanner, INSTREAM of in-memory parts over one
  IDSESSION connection (no temp files, works with a remote clamd);
- instream-per-part: pyclamd's `scan_stream`, a new connection per part
  (what the pyclamd API offers);
- contscan-dir: write the parts to a work dir, `CONTSCAN <dir>` (what
  Debian's amavisd-new entry does; clamd must be able to read our files);
- multiscan-dir: the same with `MULTISCAN` (clamd's threads share the dir).

Usage: .venv/bin/python bench/scan_transport.py [--parts 300] [--size 2048] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amavisd.decode.parts import Part  # noqa: E402
from amavisd.scan.clamd import ClamdScanner  # noqa: E402
from amavisd.testing.clamd import ClamdInstance  # noqa: E402
from amavisd.testing.eicar import EICAR  # noqa: E402


def make_parts(count: int, size: int) -> list[Part]:
    parts = []
    for n in range(count):
        body = (f"part {n} ".encode() * (size // 8 + 1))[:size]
        if n == count - 1:
            body = body[: size - len(EICAR)] + EICAR
        parts.append(Part(id=f"p{n + 1:03d}", data=body))
    return parts


def instream_session(clamd: ClamdInstance, parts: list[Part]) -> int:
    report = ClamdScanner(clamd.address).scan(parts)
    return len(report.findings)


def instream_per_part(clamd: ClamdInstance, parts: list[Part]) -> int:
    import pyclamd

    cd = pyclamd.ClamdUnixSocket(filename=str(clamd.socket_path))
    return sum(1 for p in parts if cd.scan_stream(p.data))


def _dir_command(clamd: ClamdInstance, parts: list[Part], command: str) -> int:
    workdir = tempfile.mkdtemp(prefix="bench-", dir="/tmp")
    os.chmod(workdir, 0o755)
    try:
        for part in parts:
            with open(os.path.join(workdir, part.id), "wb") as fh:
                fh.write(part.data)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(clamd.socket_path))
            sock.sendall(f"z{command} {workdir}\0".encode())
            buf = b""
            while chunk := sock.recv(65536):
                buf += chunk
        return buf.count(b"FOUND")
    finally:
        shutil.rmtree(workdir)


def contscan_dir(clamd: ClamdInstance, parts: list[Part]) -> int:
    return _dir_command(clamd, parts, "CONTSCAN")


def multiscan_dir(clamd: ClamdInstance, parts: list[Part]) -> int:
    return _dir_command(clamd, parts, "MULTISCAN")


WAYS = {
    "instream-session": instream_session,
    "instream-per-part": instream_per_part,
    "contscan-dir": contscan_dir,
    "multiscan-dir": multiscan_dir,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=300)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bst", dir="/tmp"))
    clamd = ClamdInstance(base / "c", mode="nodecomp").start()
    try:
        parts = make_parts(args.parts, args.size)
        print(f"{args.parts} parts of {args.size} B, median of {args.rounds} rounds\n")
        print("| way | ms per message | µs per part | found |")
        print("|---|---|---|---|")
        for label, way in WAYS.items():
            times, found = [], 0
            for _ in range(args.rounds):
                started = time.perf_counter()
                found = way(clamd, parts)
                times.append(time.perf_counter() - started)
            median = statistics.median(times)
            print(f"| {label} | {median * 1000:.1f} | {median / args.parts * 1e6:.0f} "
                  f"| {found} |")
    finally:
        clamd.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
