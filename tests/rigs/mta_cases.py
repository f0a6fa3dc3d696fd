# SPDX-License-Identifier: MIT
"""What the MTA tests share: the client as an MTA runs it, the test
messages that must be blocked, ways to wait for a real MTA, and the milter
cases every MTA must pass the same way.

`write_launcher()` installs amavisd-client from this checkout the way
`make deps` does (python -I -S), runnable by any user: an MTA gives its
mailers neither PATH nor PYTHONPATH, and runs them as another user.

The milter cases (`milter_*`) take a `MilterStack`: the MTA -> our
amavisd-milter -> our daemon -> clamd that each MTA's test module builds
from its own shipped configuration (etc/postfix/main.cf.milter,
etc/sendmail/milter.mc); what they check is the same for every MTA.
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from amavisd.testing.eicar import EICAR
from amavisd.testing.messages import clean_message, eicar_message
from tests.rigs.daemon import ROOT, DaemonInstance
from tests.rigs.faults import StallingClamdProxy
from tests.rigs.mailboxes import ensure_user
from tests.rigs.milter import MilterInstance

__all__ = ["BLOCKED", "DAEMON_USER", "QUIET", "REJECTING", "SENDER", "STALL", "MilterStack",
           "attachment",
           "banned_message", "header_lines", "milter_blocked_is_rejected",
           "milter_clean_mail_arrives_once", "milter_discarded_virus", "milter_down_is_4xx",
           "milter_pair", "milter_slow_scan", "own_user_daemon", "quarantined",
           "readme_section", "stalled_clamd", "wait_for", "write_launcher", "zipped_eicar"]

DAEMON_USER = "amavisd-test"  # the daemon's user and group in these tests
# No admin alerts: their default next hop is 127.0.0.1:10025, never ours to use in tests.
QUIET = {"admin_notify": []}
SYSTEM_PYTHON = "/usr/bin/python3"
T = TypeVar("T")


def write_launcher(directory: Path) -> Path:
    path = directory / "amavisd-client"
    path.write_text(f"#!{SYSTEM_PYTHON} -IS\nimport sys\nsys.path.insert(0, {ROOT!r})\n"
                    "from amavisd_client.client import main\nsys.exit(main())\n")
    path.chmod(0o755)
    return path


def attachment(filename: str, payload: bytes, subject: str = "attached") -> bytes:
    encoded = base64.encodebytes(payload).decode()
    return (f"From: mallory@example.test\nTo: someone@example.test\nSubject: {subject}\n"
            'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n'
            "--b\nContent-Type: text/plain\n\nSee attached.\n"
            f"--b\nContent-Type: application/octet-stream; name=\"{filename}\"\n"
            f"Content-Disposition: attachment; filename=\"{filename}\"\n"
            f"Content-Transfer-Encoding: base64\n\n{encoded}--b--\n").encode()


def zipped_eicar() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.com", EICAR)
    return attachment("docs.zip", buffer.getvalue(), "zipped")


def banned_message() -> bytes:
    return attachment("invoice.pdf.exe", b"MZ not really a program\n", "banned")


def wait_for(condition: Callable[[], T], timeout: float = 90.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, f"no {what} within {timeout}s"
            return value
        time.sleep(0.2)


def quarantined(daemon: DaemonInstance) -> list[str]:
    """The daemon's quarantine entries (their sidecars: virus-ID.json, banned-ID.json)."""
    folder = Path(daemon.settings["quarantine_dir"])
    return sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []


def readme_section(title: str) -> str:
    """The README's `## title` section: recipes there must be the ones the tests run."""
    text = (Path(ROOT) / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def own_user_daemon(workdir: Path, clamd_address: str,
                    settings: dict | None = None) -> DaemonInstance:
    """The daemon as its own user (DAEMON_USER), quiet, two workers: the
    mailer tests' scanner (use it as a context manager)."""
    ensure_user(DAEMON_USER, DAEMON_USER)
    return DaemonInstance(workdir, clamd_address, workers=2, user=DAEMON_USER,
                          group=DAEMON_USER, **QUIET | (settings or {}))


def header_lines(data: bytes, name: bytes) -> list[bytes]:
    head = data.split(b"\r\n\r\n", 1)[0]
    return [line for line in head.split(b"\r\n") if line.lower().startswith(name.lower() + b":")]


# -- the milter cases, the same for every MTA -----------------------------------------------

SENDER = "alice@example.test"
STALL = 6.0  # seconds a slow scan takes: past the MTA's milter timeout the tests set
REJECTING = {"virus_destiny": "reject", "banned_destiny": "reject"}
BLOCKED = [pytest.param(eicar_message(), "virus", id="eicar"),
           pytest.param(zipped_eicar(), "virus", id="eicar-zip"),
           pytest.param(banned_message(), "banned", id="banned")]


@dataclass
class MilterStack:
    """An MTA -> amavisd-milter -> amavisd -> clamd, as an MTA's tests built it."""

    mta: Any  # PostfixInstance or SendmailInstance: send(), sink, wait_queue_empty()
    milter: MilterInstance
    daemon: DaemonInstance
    queued: Callable[[], list]  # everything the MTA holds, its hold queue/quarantine too


@contextlib.contextmanager
def milter_pair(workdir: Path, clamd_address: str, daemon_settings: dict | None = None,
                milter_options: dict | None = None, *milter_args: str
                ) -> Iterator[tuple[str, DaemonInstance, MilterInstance]]:
    """Our daemon and our milter on a Unix socket: (socket path, daemon, milter)."""
    socket_path = f"{workdir}/milter.sock"
    with DaemonInstance(workdir / "d", clamd_address, workers=2,
                        **QUIET | (daemon_settings or {})) as daemon, \
            MilterInstance(workdir / "m", daemon, f"unix:{socket_path}", *milter_args,
                           **(milter_options or {})) as milter:
        yield socket_path, daemon, milter


@contextlib.contextmanager
def stalled_clamd(workdir: Path, clamd_socket: str) -> Iterator[StallingClamdProxy]:
    """The named fault (tests/rigs/faults.py): a relay in front of the real
    clamd that holds the first scan STALL seconds, then lets it through."""
    proxy = StallingClamdProxy(workdir / "slow-clamd.sock", clamd_socket, stall=True).start()

    def release() -> None:
        with contextlib.suppress(TimeoutError):
            proxy.wait_for_connection(120)
            time.sleep(STALL)
        proxy.stall = False

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.stall = False
        thread.join(STALL + 5)
        proxy.stop()


def milter_clean_mail_arrives_once(stack: MilterStack) -> None:
    sent = stack.mta.send(SENDER, ["bob@example.test", "carol@example.test"],
                          clean_message("milter clean"))
    assert sent.code == 250, (sent, stack.milter.log_text()[-2000:])
    [message] = stack.mta.sink.wait(1, timeout=60)
    stack.mta.wait_queue_empty()
    time.sleep(1)
    assert len(stack.mta.sink.messages) == 1
    assert sorted(message.rcpt_tos) == ["bob@example.test", "carol@example.test"]
    [scanned] = header_lines(message.data, b"X-Virus-Scanned")
    assert scanned.startswith(b"X-Virus-Scanned: by amavisd"), scanned  # one space


def milter_blocked_is_rejected(stack: MilterStack, message: bytes, kind: str) -> None:
    """With REJECTING destinies: 5.7.x to the SMTP client, quarantined, nothing kept."""
    sent = stack.mta.send(SENDER, ["bob@example.test"], message)
    assert sent.code == 554 and sent.text.startswith("5.7."), sent
    assert [name.split("-")[0] for name in quarantined(stack.daemon)] == [kind]
    assert stack.queued() == [] and stack.mta.sink.messages == []


def milter_discarded_virus(stack: MilterStack) -> None:
    """With virus_destiny discard: accepted, dropped, quarantined."""
    sent = stack.mta.send(SENDER, ["bob@example.test"], eicar_message())
    assert sent.code == 250, sent
    stack.mta.wait_queue_empty()
    time.sleep(1)
    assert stack.queued() == [] and stack.mta.sink.messages == []
    assert len(quarantined(stack.daemon)) == 1


def milter_down_is_4xx(stack: MilterStack, stop: Callable[[], object], what: str) -> None:
    """`stop` the daemon or the milter: the SMTP client hears 4xx, the MTA keeps nothing."""
    stop()
    sent = stack.mta.send(SENDER, ["bob@example.test"], clean_message(f"{what} down"))
    assert 400 <= sent.code < 500, sent
    assert stack.queued() == [] and stack.mta.sink.messages == []  # the sender keeps it


def milter_slow_scan(stack: MilterStack, passes: bool) -> None:
    """A scan held STALL seconds (stalled_clamd) past the MTA's milter
    timeout: answered (554) thanks to progress packets when `passes`, else
    the MTA gives up with a 4xx (the control)."""
    started = time.monotonic()
    sent = stack.mta.send(SENDER, ["bob@example.test"], eicar_message())
    if passes:
        assert time.monotonic() - started >= STALL - 1
        assert sent.code == 554, (sent, stack.milter.log_text()[-2000:])
    else:
        assert 400 <= sent.code < 500, sent
    assert stack.mta.sink.messages == []
