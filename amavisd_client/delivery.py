"""Handing a checked message to the local delivery agent (the pipe mailer's
last step): an argv template filled in per message, run with fork/exec and
the message on its stdin.

Never a shell: the template is split into words by us, and the envelope
addresses only ever become whole arguments. Stdlib modules Python has
loaded anyway only (no subprocess): the client starts once per mail.
"""

from __future__ import annotations

import os

from amavisd_client.sysexits import EX_OK, EX_TEMPFAIL


def delivery_argvs(template: str, sender: str, recipients: list[str]) -> list[list[str]]:
    """The agent's argv(s): one call for all recipients, or one a recipient
    when the template names `{recipient}`."""
    # A Sendmail A= line cannot put spaces inside one argument: without
    # white space, the template is split on commas instead.
    words = template.split() if any(c.isspace() for c in template) else template.split(",")
    if "{recipient}" in words:
        return [[w.replace("{recipient}", r).replace("{sender}", sender) for w in words]
                for r in recipients]
    argv: list[str] = []
    for word in words:
        if word == "{recipients}":
            argv.extend(recipients)
        else:
            argv.append(word.replace("{sender}", sender))
    return [argv]


def deliver(template: str, sender: str, recipients: list[str], message: bytes) -> int:
    """Run the agent(s) on `message`; the last failing agent's exit code, or EX_OK."""
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
