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

With `--mix` it instead compares INSTREAM and FILDES on the bench mix (the
parts our decoder hands the scanner for each message of `make bench`'s mix),
alternating A/B on one clamd with its temp dir on tmpfs, and reports clamd's
CPU (its /proc ticks) and ours a message: the machine is shared, so CPU, not
time, is the figure.

Usage: .venv/bin/python bench/scan_transport.py [--parts 300] [--size 2048] [--rounds 5]
       .venv/bin/python bench/scan_transport.py --mix [--rounds 7] [--passes 4]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from amavisd.decode.parts import Part  # noqa: E402
from amavisd.scan.clamd import WINDOW, ClamdScanner  # noqa: E402
from amavisd.scan.clamd_session import HANGUPS, ClamdSession, Hangup, _left  # noqa: E402
from amavisd.testing.clamd import ClamdInstance, memory_temp_dir  # noqa: E402
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


# -- INSTREAM or FILDES on the bench mix, A/B -------------------------------------
# FILDES is a prototype here, not in the scanner: measured in session 24 it cut
# clamd's CPU a part by ~18 % (no stream file) but cost us 30-45 % more (a memfd,
# a write, a sendmsg and a close a part): at most 0.03 ms of the 1.5-3 ms a
# message costs clamd and the daemon together, not worth a second transport.

FD_REPLY = re.compile(r"^(\d+: )fd\[\d+\]: ")


def part_descriptor(part: Part) -> int:
    """The part's bytes as a descriptor: its spill file, or a memfd (no name
    in any file system)."""
    if part.spill_path is not None:
        return os.open(part.spill_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    fd = os.memfd_create("amavisd-part", os.MFD_CLOEXEC)
    try:
        view = memoryview(part.data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


class FildesSession(ClamdSession):
    """zFILDES, a byte and the descriptor in one sendmsg a part: clamd's
    reader takes at most one descriptor a recvmsg (the kernel stops a read
    at a message carrying descriptors), so each arrives with its command."""

    def send(self, parts, deadline: float) -> None:
        try:
            for part in parts:
                fd = part_descriptor(part)
                try:
                    self.sock.settimeout(_left(deadline))
                    socket.send_fds(self.sock, [b"zFILDES\0\0"], [fd])
                finally:
                    os.close(fd)
        except HANGUPS as err:
            raise Hangup(f"hung up while we sent: {err}") from None


class FildesScanner(ClamdScanner):
    """ClamdScanner over FILDES (a Unix socket clamd only): its replies say
    `N: fd[12]: OK` where INSTREAM's say `N: stream: OK`."""

    def _session(self, deadline: float, keep: bool):
        session, reused = super()._session(deadline, keep)
        session.__class__ = FildesSession
        return session, reused

    def _settle(self, reply: str, *rest) -> bool:
        return super()._settle(FD_REPLY.sub(r"\1stream: ", reply), *rest)


def mix_parts(workdir: Path) -> list[list[Part]]:
    """The scannable parts of each message of `make bench`'s mix (spilled
    ones too: the decoder spills big parts to `workdir`)."""
    import corpus  # bench/corpus.py

    from amavisd.decode.engine import decompose

    mix, _missing = corpus.synthetic(workdir)
    real = corpus.real(None)
    messages = mix + real[:: max(1, len(real) // 200)]
    return [decompose(m.data, tempbase=str(workdir)).scannable() for m in messages]


def clamd_ticks(pid: int) -> int:
    """utime + stime of clamd, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def one_run(scanner: ClamdScanner, clamd_pid: int, messages: list[list[Part]],
            passes: int) -> tuple[float, float, int]:
    """(clamd CPU s, our CPU s, findings) for `passes` times the mix."""
    clamd0, ours0, found = clamd_ticks(clamd_pid), time.process_time(), 0
    for _ in range(passes):
        for parts in messages:
            found += len(scanner.scan(parts).findings)
    hz = os.sysconf("SC_CLK_TCK")
    return (clamd_ticks(clamd_pid) - clamd0) / hz, time.process_time() - ours0, found


def mix_ab(args: argparse.Namespace, base: Path) -> None:
    messages = mix_parts(base)
    nparts = sum(map(len, messages))
    spilled = sum(p.spill_path is not None for parts in messages for p in parts)
    temp = memory_temp_dir("bst-clamd")
    clamd = ClamdInstance(base / "c", mode="nodecomp", temp_dir=temp,
                          options=tuple(args.clamd_option)).start()
    try:
        ways = {}
        for spec in args.ways.split(","):  # transport[:window]
            way, _, window = spec.partition(":")
            kind = FildesScanner if way == "fildes" else ClamdScanner
            ways[spec] = kind(clamd.address, window=int(window or WINDOW))
        for scanner in ways.values():  # warm: sessions open, clamd threads up
            one_run(scanner, clamd.pid, messages, 1)
        runs: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
        found: dict[str, int] = {}
        for n in range(args.rounds):
            order = list(ways)[n % len(ways):] + list(ways)[: n % len(ways)]
            for way in order:
                clamd_s, ours_s, found[way] = one_run(ways[way], clamd.pid, messages,
                                                      args.passes)
                runs[way].append((clamd_s, ours_s))
        count = len(messages) * args.passes
        print(f"{len(messages)} messages, {nparts} parts ({nparts / len(messages):.1f} a "
              f"message, {spilled} spilled), {args.passes} passes a run, {args.rounds} "
              f"runs a way alternating; clamd temp dir {temp or '/tmp'}; clamd.conf "
              f"also {args.clamd_option or 'nothing'}\n")
        print("| way | clamd ms/msg (median) | min-max | ours ms/msg | clamd+ours | "
              "clamd µs/part | ours µs/part | found |")
        print("|---|---|---|---|---|---|---|---|")
        for way, values in runs.items():
            clamd_ms = [c / count * 1e3 for c, _ in values]
            ours_ms = [o / count * 1e3 for _, o in values]
            both = statistics.median(c + o for c, o in values) / count * 1e3
            cm, om = statistics.median(clamd_ms), statistics.median(ours_ms)
            per = len(messages) / nparts * 1e3
            print(f"| {way} | {cm:.3f} | {min(clamd_ms):.3f}-{max(clamd_ms):.3f} | {om:.3f} "
                  f"| {both:.3f} | {cm * per:.0f} | {om * per:.0f} | {found[way]} |")
        for scanner in ways.values():
            scanner.close()
    finally:
        clamd.stop()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=300)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mix", action="store_true", help="INSTREAM vs FILDES on the bench mix")
    ap.add_argument("--passes", type=int, default=4, help="times the mix a --mix run")
    ap.add_argument("--ways", default="instream,fildes",
                    help="--mix: transport[:window],... (instream or fildes)")
    ap.add_argument("--clamd-option", action="append", default=[], metavar="LINE",
                    help='a clamd.conf line for --mix, e.g. "ScanImageFuzzyHash no"')
    args = ap.parse_args()
    if args.mix:
        base = Path(tempfile.mkdtemp(prefix="bst", dir="/tmp"))
        try:
            mix_ab(args, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return 0
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
