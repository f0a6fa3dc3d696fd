"""Mailer mode delivers what was scanned (issue 10, item 13).

The attack: a member of the daemon's group (the temp base is group-writable)
swaps the client's spool dir for its own, holding EICAR, after the daemon
gave its verdict on the client's clean message; a client that re-opens the
spool by path hands the attacker's bytes to the delivery agent, with
`X-Virus-Scanned`. The attacker here is a separate uid (`amavisd-evil`) in
the daemon's group, exchanging dirs with renameat2(RENAME_EXCHANGE); the
client runs as the daemon's user (`amavisd-test`), as Sendmail's U= would
run it. Twice: on the daemon's temp base (01770: the sticky bit makes every
swap fail), and on one made 0770, where a swap and a swap back between the
daemon's read and the client's check could not be seen: there the client
refuses to spool at all (tempfail). The client delivers from the descriptor
it spooled to, after checking the spool is still its own.

Bounded: AMAVISD_RACE_SECONDS (default 4) of attack.

Also: the message is spooled before connecting, so a slow stdin does not
hold one of the daemon's workers.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import threading
import time

import pytest

from amavisd.testing.eicar import EICAR
from amavisd.testing.messages import clean_message
from tests.rigs.daemon import CLIENT_LAUNCHER, DaemonInstance, client_argv
from tests.rigs.mailboxes import ensure_group, ensure_user

pytestmark = pytest.mark.integration

GROUP = "amavisd-test"
DAEMON_USER = "amavisd-test"
ATTACKER = "amavisd-evil"
RACE_SECONDS = float(os.environ.get("AMAVISD_RACE_SECONDS", "4"))
CLIENTS = 3  # mailer clients running at once
EVIL_MARK = b"EVIL-PAYLOAD-7f3a"
# The venv's interpreter may live in root's home: the other users run Debian's.
SYSTEM_PYTHON = "/usr/bin/python3"

# Runs as the attacker: exchange every client spool dir that has its
# email.txt with a dir of our own holding EICAR, a moment later.
ATTACK = r"""
import ctypes, os, random, sys, time
tempbase, seconds, payload_path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
payload = open(payload_path, "rb").read()
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
def exchange(a, b):
    return libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) == 0
swaps = attempts = k = 0
seen = set()
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        names = os.listdir(tempbase)
    except OSError:
        continue
    for name in names:
        victim = os.path.join(tempbase, name)
        if not name.startswith("client-") or name in seen:
            continue
        if not os.path.exists(os.path.join(victim, "email.txt")):
            continue
        seen.add(name)
        decoy = os.path.join(tempbase, "evil-%d-%d" % (os.getpid(), k))
        k += 1
        try:
            os.mkdir(decoy, 0o755)
            fd = os.open(os.path.join(decoy, "email.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, payload)
            os.close(fd)
        except OSError:
            continue
        time.sleep(random.random() * 0.004)
        attempts += 1
        swaps += exchange(decoy, victim)
print(swaps, attempts)
"""


@pytest.fixture(scope="module")
def accounts():
    if os.geteuid() != 0:
        pytest.skip("needs root to create the attacker's and the daemon's users")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} for the other users")
    gid = ensure_group(GROUP)
    return gid, ensure_user(DAEMON_USER, GROUP), ensure_user(ATTACKER, GROUP)


def run_as(user: pwd.struct_passwd, gid: int, argv: list[str], **kwargs):
    return subprocess.Popen(argv, user=user.pw_uid, group=gid, extra_groups=[gid],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.parametrize("mode", [0o1770, 0o770])
def test_the_delivery_agent_never_gets_the_attacker_s_bytes(short_tmp, clamd_nodecomp,
                                                             accounts, mode):
    gid, daemon_user, attacker = accounts
    out = short_tmp / "out"
    out.mkdir()
    os.chown(out, daemon_user.pw_uid, gid)
    out.chmod(0o700)
    payload = short_tmp / "evil.eml"
    payload.write_bytes(b"Subject: " + EVIL_MARK + b"\n\n" + EICAR + b"\n")
    payload.chmod(0o644)
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=2,
                            user=DAEMON_USER, group=GROUP, virus_destiny="reject")
    with daemon:
        tempbase = daemon.tempbase
        os.chmod(tempbase, mode)
        env = {"AMAVISD_SOCKET": daemon.socket_path, "PATH": os.environ["PATH"]}
        evil = run_as(attacker, gid, [SYSTEM_PYTHON, "-I", "-c", ATTACK, tempbase,
                                      str(RACE_SECONDS), str(payload)])
        outcomes: dict[str, int] = {}
        hits: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + RACE_SECONDS

        def mail_loop(worker: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                target = out / f"{worker}-{n}.eml"
                proc = run_as(daemon_user, gid, [SYSTEM_PYTHON, "-I", "-S", "-c",
                                                 CLIENT_LAUNCHER,
                    "-d", f"dd of={target} status=none", "-f", "alice@example.test", "--",
                    "bob@example.test"], stdin=subprocess.PIPE, env=env)
                stdout, stderr = proc.communicate(clean_message(), timeout=60)
                delivered = target.read_bytes() if target.exists() else b""
                with lock:
                    key = {0: "delivered", 75: "tempfail", 69: "rejected"}.get(
                        proc.returncode, f"exit {proc.returncode}")
                    outcomes[key] = outcomes.get(key, 0) + 1
                    if EVIL_MARK in delivered or EICAR in delivered:
                        hits.append(f"{target.name}: {stdout!r}")
                    elif proc.returncode == 0:
                        assert delivered.startswith(b"X-Virus-Scanned: ")
                        assert delivered.endswith(clean_message().split(b"\n\n", 1)[1])

        threads = [threading.Thread(target=mail_loop, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stdout, stderr = evil.communicate(timeout=30)
        swaps, attempts = map(int, stdout.split())
    print(f"race: {sum(outcomes.values())} mailer runs {outcomes}, attacker swapped "
          f"{swaps} of {attempts} spool dirs, attacker bytes delivered: {len(hits)}")
    assert hits == [], hits
    if mode & 0o1000:
        assert attempts > 0, (stderr, outcomes)  # the attack did happen
        assert swaps == 0  # the sticky bit: no rename of another's dir
        assert outcomes.get("delivered", 0) > 0, outcomes  # clean mail still goes through
    else:
        # no spool is ever made there, so there is nothing to swap
        assert outcomes == {"tempfail": sum(outcomes.values())}, outcomes


def test_stdin_is_spooled_before_connecting(short_tmp, clamd_nodecomp):
    """A mailer client whose stdin trickles holds no worker: with one worker,
    another client gets its verdict at once."""
    with DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1) as daemon:
        env = dict(os.environ, AMAVISD_SOCKET=daemon.socket_path)
        slow = subprocess.Popen(client_argv() + ["-d", f"dd of={short_tmp / 'slow.eml'} "
                                                 "status=none", "-f", "a@example.test", "--",
                                                 "b@example.test"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            assert slow.stdin is not None
            slow.stdin.write(clean_message()[:20])
            slow.stdin.flush()
            time.sleep(0.5)  # the slow client is well into its stdin
            message = short_tmp / "m.eml"
            message.write_bytes(clean_message())
            started = time.monotonic()
            quick = daemon.client(str(message), timeout=30)
            elapsed = time.monotonic() - started
            assert quick.returncode == 0, quick.stdout + quick.stderr
            assert elapsed < 2.0, f"the only worker was held by a client still reading stdin " \
                                  f"({elapsed:.1f} s)"
            slow.stdin.write(clean_message()[20:])
            slow.stdin.close()
            assert slow.wait(30) == 0
            assert (short_tmp / "slow.eml").read_bytes().endswith(
                clean_message().split(b"\n\n", 1)[1])
        finally:
            if slow.poll() is None:
                slow.kill()
                slow.wait()
