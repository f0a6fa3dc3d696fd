"""The milter's CPU a message, A against B, without Postfix or clamd.

Through Postfix the VM's drift (+-20 % over minutes) hides a 3 % change in
the milter. Here two milters (A: a pristine copy, `--a DIR`; B: this tree)
serve the same recorded Postfix conversation (one message a connection, as
smtp-source makes Postfix do: optneg, connect..rcpt, headers/body/EOM,
abort abort quit) from `--sessions` client threads, and ask one fake daemon
that answers every AM.PDP request with a recorded reply at once. Batches
alternate A, B, B, A ...; each batch's milter CPU is read from
/proc/PID/schedstat (ns on CPU) and divided by its messages.

    .venv/bin/python bench/milter_replay.py --a /tmp/before -n 1000 --pairs 8 -s 4

The conversation: bench/milter_replay.json (recorded with strace
-xx on our milter through the bench's Postfix; `load_conversation`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
FINAL = set(b"cartdy")  # reply codes that end a message's replies
CONVERSATION = Path(__file__).with_name("milter_replay.json")
FLOORS = {"asyncio": "milter_floor.py", "plain": "milter_floor_plain.py"}


def load_conversation(path: str | Path) -> list[tuple[str, int, bytes]]:
    """[(op, fd, bytes)]: op recvfrom or sendto, as the milter saw them."""
    packets = json.loads(Path(path).read_text())["packets"]
    return [(op, fd, bytes.fromhex(data)) for op, fd, data in packets]


def fake_daemon(path: str, reply: bytes) -> None:
    """Answers every request block (up to an empty line) with `reply`, forever."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)

    def serve(conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, _, buf = buf.partition(b"\r\n\r\n")
                    conn.sendall(reply)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def recv_packets(sock: socket.socket, until_final: bool) -> None:
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("milter closed the connection")
        buf += data
        pos, codes = 0, []
        while len(buf) - pos >= 5:
            length = int.from_bytes(buf[pos:pos + 4], "big")
            if len(buf) - pos < 4 + length:
                break
            codes.append(buf[pos + 4])
            pos += 4 + length
        if codes and (not until_final or codes[-1] in FINAL):
            return


def one_message(path: str, chunks: list[bytes]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(chunks[0])
        recv_packets(sock, False)  # optneg reply
        for chunk in chunks[1:-1]:
            sock.sendall(chunk)
        recv_packets(sock, True)  # the verdict
        sock.sendall(chunks[-1])  # abort abort quit
        sock.recv(1)  # the milter closes


def batch(path: str, chunks: list[bytes], n: int, sessions: int) -> None:
    left = [n]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            one_message(path, chunks)

    threads = [threading.Thread(target=worker) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])




def start_milter(root: str, work: Path, name: str, daemon: str,
                 floor: str = "", conv: str = "") -> tuple[subprocess.Popen, str]:
    sock = str(work / f"{name}.sock")
    tempbase = work / f"tmp{name}"
    tempbase.mkdir(mode=0o700)
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("NOTIFY_SOCKET", None)
    log = open(work / f"{name}.log", "wb")
    argv = [sys.executable, "-m", "amavisd_client.milter.main", "--foreground",
            "--log", "stderr", "--listen", f"unix:{sock}", "-c", os.devnull,
            "--daemon-socket", daemon, "--tempbase", str(tempbase)]
    if floor:  # a floor (FLOORS) serving `conv` instead of a milter
        argv = [sys.executable, str(Path(__file__).with_name(FLOORS[floor])), sock, daemon, conv]
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=root)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"milter {name} did not start: {(work / f'{name}.log').read_text()}")
        time.sleep(0.05)
    return proc, sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--a", help="root of the A copy (holds amavisd_client/)")
    parser.add_argument("--b", default=ROOT, help="root of the B copy (default: this tree)")
    parser.add_argument("-n", type=int, default=1000, help="messages a batch")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("-s", "--sessions", type=int, default=4)
    parser.add_argument("--conv", default=str(CONVERSATION))
    for name in "ab":
        parser.add_argument(f"--{name}-floor", nargs="?", const="asyncio", choices=FLOORS,
                            help=f"{name.upper()} is a floor, not a milter: asyncio (the default,"
                            " bench/milter_floor.py) or plain (bench/milter_floor_plain.py)")
    args = parser.parse_args()
    if not (args.a or args.a_floor):
        parser.error("--a or --a-floor is required")
    conv = load_conversation(args.conv)
    mta_fd = conv[0][1]
    chunks = [d for op, fd, d in conv if op == "recvfrom" and fd == mta_fd]
    reply = next(d for op, fd, d in conv if op == "recvfrom" and fd != mta_fd)
    work = Path(tempfile.mkdtemp(prefix="milter-replay"))
    daemon = str(work / "daemon.sock")
    threading.Thread(target=fake_daemon, args=(daemon, reply), daemon=True).start()
    time.sleep(0.2)
    procs = {}
    try:
        for name, root, floor in (("A", args.a, args.a_floor), ("B", args.b, args.b_floor)):
            procs[name] = start_milter(root or ROOT, work, name, daemon, floor or "", args.conv)
        for _, sock in procs.values():  # warm up
            batch(sock, chunks, 200, args.sessions)
        per: dict[str, list[float]] = {"A": [], "B": []}
        for pair in range(args.pairs):
            for name in ("AB" if pair % 2 == 0 else "BA"):
                proc, sock = procs[name]
                before = cpu_ns(proc.pid)
                started = time.perf_counter()
                batch(sock, chunks, args.n, args.sessions)
                wall = time.perf_counter() - started
                us = (cpu_ns(proc.pid) - before) / 1000 / args.n
                per[name].append(us)
                print(f"pair {pair + 1} {name}: {us:7.1f} us CPU/msg, {args.n / wall:6.0f} msgs/s",
                      flush=True)
        ratios = [b / a for a, b in zip(per["A"], per["B"], strict=True)]
        print(f"\nA median {statistics.median(per['A']):.1f} us/msg, "
              f"B median {statistics.median(per['B']):.1f} us/msg, B/A per pair: "
              + " ".join(f"{r:.3f}" for r in ratios)
              + f" (median {statistics.median(ratios):.3f})")
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
