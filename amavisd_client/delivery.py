"""Handing a checked message to the local delivery agent (the pipe mailer's
last step): an argv template filled in per message, run with fork/exec and
the message on its stdin; or `maildir:DIR`, written here.

Never a shell: the template is split into words by us, and the envelope
addresses only ever become whole arguments (or, for a maildir, one checked
path component). Stdlib modules Python has loaded anyway only (no
subprocess): the client starts once per mail.

One exit code answers for every recipient of a call, so a template that
delivers recipient by recipient (`{recipient}`) must be given one recipient
a call: if the second delivery failed after the first succeeded, a tempfail
would make the MTA deliver the first again, and a success would lose the
second. `per_recipient()` tells the client to refuse such a call before it
delivers anything.
"""

from __future__ import annotations

import os
import time

from amavisd_client.sysexits import EX_NOUSER, EX_OK, EX_TEMPFAIL

MAILDIR = "maildir:"
_counter = [0]


def _words(template: str) -> list[str]:
    # A Sendmail A= line cannot put spaces inside one argument: without
    # white space, the template is split on commas instead.
    return template.split() if any(c.isspace() for c in template) else template.split(",")


def per_recipient(template: str) -> bool:
    """True when the template makes one delivery a recipient."""
    if template.startswith(MAILDIR):
        return "{recipient}" in template
    return "{recipient}" in _words(template)


def delivery_argvs(template: str, sender: str, recipients: list[str]) -> list[list[str]]:
    """The agent's argv(s): one call for all recipients, or one a recipient
    when the template names `{recipient}`."""
    words = _words(template)
    if "{recipient}" in words:
        return [[_fill(w, sender, r) for w in words] for r in recipients]
    argv: list[str] = []
    for word in words:
        if word == "{recipients}":
            argv.extend(recipients)
        else:
            argv.append(_fill(word, sender))
    return [argv]


def _fill(word: str, sender: str, recipient: str | None = None) -> str:
    """The template's own `{sender}` and `{recipient}` in one pass: an
    address is never read again as a template (a recipient `{sender}@x`
    must not become the sender's text)."""
    pieces = word.split("{recipient}") if recipient is not None else [word]
    return (recipient or "").join(piece.replace("{sender}", sender) for piece in pieces)


def deliver(template: str, sender: str, recipients: list[str], message: bytes) -> int:
    """Run the agent(s) on `message`; the last failing agent's exit code, or EX_OK."""
    if template.startswith(MAILDIR):
        paths = maildir_paths(template[len(MAILDIR):], recipients)
        if paths is None:
            return EX_NOUSER
        return max((write_maildir(path, message) for path in paths), default=EX_OK)
    worst = EX_OK
    for argv in delivery_argvs(template, sender, recipients):
        code = run_agent(argv, message)
        if code != EX_OK:
            worst = code
    return worst


def run_agent(argv: list[str], message: bytes) -> int:
    """fork/exec the delivery agent with the message on its stdin; no shell."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(read_fd, 0)
            os.close(read_fd)
            os.close(write_fd)
            os.dup2(2, 1)  # the agent's chatter must not mix with our verdict output
            os.execvp(argv[0], argv)
        except OSError as err:
            os.write(2, f"4.3.0 cannot run {argv[0]}: {err.strerror}\n".encode())
        os._exit(EX_TEMPFAIL)
    os.close(read_fd)
    try:
        view = memoryview(message)
        while view:
            view = view[os.write(write_fd, view):]
    except BrokenPipeError:
        pass  # the agent stopped reading; its exit status says why
    finally:
        os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return EX_TEMPFAIL  # killed by a signal: let the MTA retry


# -- maildir ---------------------------------------------------------------------------


def maildir_paths(template: str, recipients: list[str]) -> list[str] | None:
    """The maildir(s) of `maildir:DIR`: one, or one a recipient with
    `{recipient}`, which must then be a plain name (no '/', no leading dot,
    no NUL): an envelope address never climbs out of DIR. None if one is not."""
    if "{recipient}" not in template:
        return [template]
    paths = []
    for rcpt in recipients:
        if not rcpt or "/" in rcpt or "\0" in rcpt or rcpt.startswith("."):
            os.write(2, f"5.1.3 amavisd-client: {rcpt!r} cannot name a maildir\n".encode())
            return None
        paths.append(template.replace("{recipient}", rcpt))
    return paths


def write_maildir(path: str, message: bytes) -> int:
    """Deliver into the existing maildir `path` (tmp/new/cur made if missing):
    written and fsynced in tmp/, then renamed into new/, so a reader never
    sees half a message; any failure is a tempfail (the MTA keeps the mail).

    Never as root (Sendmail's F=S mailer runs us so, for mail.local): a
    maildir belongs to its user, who can make its tmp/ or new/ (or the
    maildir) a link to any directory, and root would write the sender's
    bytes there (and a file the user could not read anyway). Refused with
    a tempfail that says so: run the client as the maildirs' owner."""
    if os.geteuid() == 0:
        os.write(2, b"4.3.5 amavisd-client: maildir delivery as root refused: run the "
                    b"client as the maildirs' owner (pipe user=, Sendmail U= without F=S)\n")
        return EX_TEMPFAIL
    _counter[0] += 1
    now = time.time()
    host = os.uname().nodename.replace("/", "\\057").replace(":", "\\072")
    name = (f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{_counter[0]}"
            f"R{os.urandom(6).hex()}.{host}")
    tmp = os.path.join(path, "tmp", name)
    try:
        if not os.path.isdir(path):
            raise FileNotFoundError(2, "no such maildir")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            view = memoryview(message)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(path, "new", name))
        dir_fd = os.open(os.path.join(path, "new"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the 0 we exit with means the mail is on disk
        finally:
            os.close(dir_fd)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        os.write(2, f"4.2.0 amavisd-client: maildir {path}: {err.strerror}\n".encode())
        return EX_TEMPFAIL
    return EX_OK
