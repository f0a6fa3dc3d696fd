# SPDX-License-Identifier: MIT
"""Where the mailer-mode tests look for what a real delivery agent delivered.

`LocalUsers`: system users whose mbox is /var/mail/USER, written by the real
mail.local from the unpacked Sendmail; `count()` tells how many copies each
holds (the double-delivery tests count them). `full()` makes one user's
mailbox a file on a full tmpfs (bind-mounted over /var/mail/USER): a real
disk-full, so mail.local fails for that user only, with EX_TEMPFAIL, while
it delivers to the others. Maildirs (the client's `maildir:` agent) are
counted with `maildir_count()`; `full_dir()` is the same fault for them.

Root only (users, mounts); everything made is removed afterwards.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LocalUsers", "ensure_group", "ensure_user", "full_dir", "maildir_count",
           "maildir_messages"]

MAIL_SPOOL = Path("/var/mail")
# mbox separators as mail.local writes them: at the start, or after an empty line
_FROM_LINE = re.compile(rb"(?:\A|\n\n)From ")


def ensure_group(name: str) -> int:
    for _ in range(20):  # another session may be creating it too
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            subprocess.run(["groupadd", "--system", name], capture_output=True)
            time.sleep(0.1)
    return grp.getgrnam(name).gr_gid


def ensure_user(name: str, group: str | None = None) -> pwd.struct_passwd:
    """A system user without a home (its own group, or `group`)."""
    for _ in range(20):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            argv = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", name]
            if group:
                ensure_group(group)
                argv[1:1] = ["--gid", group]
            subprocess.run(argv, capture_output=True)
            time.sleep(0.1)
    return pwd.getpwnam(name)


class LocalUsers:
    """Users `prefix1..N` with their /var/mail mailboxes empty at start and removed at the end."""

    def __init__(self, names: list[str]):
        self.names = names
        self.users = {name: ensure_user(name) for name in names}

    def __enter__(self) -> LocalUsers:
        self.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    def clear(self) -> None:
        for name in self.names:
            for path in (MAIL_SPOOL / name, MAIL_SPOOL / f"{name}.lock"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def mbox(self, name: str) -> bytes:
        try:
            return (MAIL_SPOOL / name).read_bytes()
        except FileNotFoundError:
            return b""

    def messages(self, name: str) -> list[bytes]:
        data = self.mbox(name)
        starts = [m.start() + (2 if m.group().startswith(b"\n") else 0)
                  for m in _FROM_LINE.finditer(data)]
        ends = starts[1:] + [len(data)] if starts else []
        return [data[a:b] for a, b in zip(starts, ends, strict=True)]

    def count(self) -> dict[str, int]:
        return {name: len(self.messages(name)) for name in self.names}

    @contextlib.contextmanager
    def full(self, name: str) -> Iterator[None]:
        """While inside, `name`'s mailbox sits on a full disk (ENOSPC on write)."""
        user = self.users[name]
        box = MAIL_SPOOL / name
        box.touch()
        os.chown(box, user.pw_uid, user.pw_gid)
        box.chmod(0o600)
        with full_dir() as disk:
            backing = Path(disk) / "mbox"
            backing.touch()
            os.chown(backing, user.pw_uid, user.pw_gid)
            backing.chmod(0o600)
            _fill(Path(disk))
            subprocess.run(["mount", "--bind", str(backing), str(box)], check=True)
            try:
                yield
            finally:
                subprocess.run(["umount", str(box)], check=False)
        box.unlink()  # mail.local makes it again, as it does for a new user


@contextlib.contextmanager
def full_dir(size: str = "64k") -> Iterator[str]:
    """A small tmpfs (mode 0755); fill it with `_fill` to make writes fail."""
    path = tempfile.mkdtemp(prefix="amdfull", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)


def _fill(path: Path) -> None:
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)


def maildir_messages(path: str | os.PathLike[str]) -> list[bytes]:
    found = []
    for sub in ("new", "cur"):
        folder = Path(path) / sub
        if folder.is_dir():
            found += [entry.read_bytes() for entry in sorted(folder.iterdir())]
    return found


def maildir_count(path: str | os.PathLike[str]) -> int:
    return len(maildir_messages(path))
