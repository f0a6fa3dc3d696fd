"""amavisd-client: hand one message to the amavisd daemon and act on its verdict.

Two uses:

  amavisd-client [options] FILE...
      Check message files; print one verdict line each.
  amavisd-client [options] -f SENDER [--] RECIPIENT...
      Sendmail mailer: the message comes on stdin; on a clean verdict it goes,
      with the daemon's header edits, to the local delivery agent (--deliver).

Exit codes (sysexits.h): 0 accepted/delivered (also for a discarded message
in mailer mode), 69 rejected, 75 on every doubt (daemon down, timeout,
scanner failure, no reply, several recipients for a per-recipient agent),
99 discarded (file mode), 64 usage; in mailer mode a delivery agent's own
exit code is passed on.

Start-up time is the point of this file: it imports only what Python has
loaded anyway (`_socket`, not `socket`; no argparse, getopt, re or
subprocess), and is installed to run with `python3 -I -S`.

In mailer mode the message is spooled before connecting (the daemon hangs
up connections idle for client_idle_timeout), and what is delivered is read
back from the spooled file's descriptor after checking that the spool is
still the one the daemon was told about (see spool.py): never bytes that
someone else put at the path.

This file is the command line only: arguments, file mode and mailer mode.
What else needs a verdict (the milter shim, the SMTP forwarder) imports the
pieces without it: connection.py (talking AM.PDP to the daemon), spool.py,
edits.py (the daemon's header edits), delivery.py (the local agent).
"""

from __future__ import annotations

import os
import sys

from amavisd_client.connection import ClientError, Connection, check
from amavisd_client.delivery import deliver, per_recipient
from amavisd_client.edits import edit_message, header_edits
from amavisd_client.spool import Spool, SpoolError, inside
from amavisd_client.sysexits import EX_DISCARD, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE
from amavisd_client.wire.address import parse_or_path
from amavisd_client.wire.ampdp import Block

DEFAULT_SOCKET = "/var/lib/amavis/amavisd.sock"
DEFAULT_TIMEOUT = 600.0
# A file check has no envelope, but amavisd-new fails on a request without a
# recipient ("Can't use an undefined value as an ARRAY reference"): send one.
FILE_CHECK_ENVELOPE = ("<>", ["postmaster@localhost"])
# return_value -> exit code; in mailer mode "discard" means "accepted, not delivered".
FILE_MODE_EXIT = {"continue": EX_OK, "accept": EX_OK, "reject": EX_UNAVAILABLE,
                  "discard": EX_DISCARD, "tempfail": EX_TEMPFAIL}
# Which outcome wins when several files are checked: the most actionable first.
EXIT_PRECEDENCE = (EX_TEMPFAIL, EX_UNAVAILABLE, EX_DISCARD, EX_OK)

USAGE = """\
usage: amavisd-client [options] FILE...
       amavisd-client [options] -f SENDER [--] RECIPIENT... < message
options:
  -s, --socket ADDR     daemon socket: a path or host:port ($AMAVISD_SOCKET,
                        default %s)
  -T, --tempbase DIR    spool dir the daemon accepts ($AMAVISD_TEMPBASE,
                        default tmp/ beside the socket)
  -t, --timeout SEC     seconds to wait for the verdict (default %g)
  -d, --deliver ARGV    local delivery agent, an argv template split on
                        spaces (or, with none, on commas), never a shell
                        ($AMAVISD_DELIVER); {sender},
                        {recipients} (all, as separate arguments) and
                        {recipient} (one call per recipient: then only one
                        recipient a call is accepted) are filled in;
                        or maildir:DIR (DIR may hold {recipient}; not as
                        root: run as the maildirs' owner)
  -f SENDER             envelope sender: selects mailer mode (stdin)
  -q, --quiet           print nothing in file mode
""" % (DEFAULT_SOCKET, DEFAULT_TIMEOUT)  # noqa: UP031 (braces are literal here)


class Options:
    def __init__(self) -> None:
        self.socket = os.environ.get("AMAVISD_SOCKET") or DEFAULT_SOCKET
        self.tempbase = os.environ.get("AMAVISD_TEMPBASE") or ""
        self.timeout = DEFAULT_TIMEOUT
        self.deliver = os.environ.get("AMAVISD_DELIVER") or ""
        self.sender: str | None = None
        self.quiet = False
        self.args: list[str] = []


_WITH_VALUE = {"-s": "socket", "--socket": "socket", "-T": "tempbase", "--tempbase": "tempbase",
               "-t": "timeout", "--timeout": "timeout", "-d": "deliver", "--deliver": "deliver",
               "-f": "sender"}


def parse_args(argv: list[str]) -> Options:
    """A small getopt: `-x VALUE`, `-xVALUE`, `--long VALUE`, `--long=VALUE`, `--`."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            opts.args.extend(argv[i:])
            break
        if arg in ("-h", "--help"):
            raise SystemExit(USAGE)
        if arg in ("-q", "--quiet"):
            opts.quiet = True
            continue
        name, value = arg, None
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            name, value = arg[:2], arg[2:]
        if name in _WITH_VALUE:
            if value is None:
                if i >= len(argv):
                    raise ValueError(f"option {name} needs a value")
                value = argv[i]
                i += 1
            setattr(opts, _WITH_VALUE[name], value)
        elif arg.startswith("-") and arg != "-":
            raise ValueError(f"unknown option {arg}")
        else:
            opts.args.append(arg)
    try:
        opts.timeout = float(opts.timeout)
    except ValueError:
        raise ValueError(f"bad --timeout {opts.timeout!r}") from None
    address = parse_or_path(opts.socket)  # AddressError is a ValueError: a usage error
    if address.is_tcp:
        if not opts.tempbase:
            raise ValueError("with a TCP socket, give --tempbase (the daemon's temp base)")
    else:
        opts.socket = os.path.abspath(address.path)
        opts.tempbase = opts.tempbase or os.path.join(os.path.dirname(opts.socket), "tmp")
    return opts


# -- verdicts ----------------------------------------------------------------------------


def reply_text(block: Block) -> str:
    return block.get("setreply") or block.get("return_value") or "no verdict"


def file_mode(opts: Options) -> int:
    conn = Connection(opts.socket, opts.timeout)
    codes = []
    try:
        conn.open()
    except ClientError as err:
        say(f"amavisd-client: tempfail: {err}", stream=sys.stderr)
        return EX_TEMPFAIL
    try:
        for path in opts.args:
            codes.append(check_file(conn, opts, path))
    finally:
        conn.close()
    return min(codes, key=EXIT_PRECEDENCE.index)


def check_file(conn: Connection, opts: Options, path: str) -> int:
    spool = None
    try:
        if path == "-" or not inside(path, opts.tempbase):
            try:
                fd = 0 if path == "-" else os.open(path, os.O_RDONLY)
            except OSError as err:
                say(f"{path}: cannot read: {err.strerror}", stream=sys.stderr)
                return EX_TEMPFAIL
            try:
                spool = Spool(opts.tempbase)
                spool.write_from(fd)
            finally:
                if fd:
                    os.close(fd)
            mail_file = spool.path
        else:
            mail_file = os.path.realpath(path)
        reply = check(conn, mail_file, *FILE_CHECK_ENVELOPE)
    except (ClientError, SpoolError) as err:
        say(f"{path}: tempfail: {err}", stream=sys.stderr)
        return EX_TEMPFAIL
    finally:
        if spool is not None:
            spool.remove()
    outcome = reply.get("return_value") or "tempfail"
    if not opts.quiet:
        say(f"{path}: {reply_text(reply)}")
    return FILE_MODE_EXIT.get(outcome, EX_TEMPFAIL)


def mailer_mode(opts: Options) -> int:
    if not opts.args:
        say("amavisd-client: no recipients given", stream=sys.stderr)
        return EX_USAGE
    if not opts.deliver:
        say("4.3.5 amavisd-client: no delivery agent configured (--deliver)")
        return EX_TEMPFAIL
    if len(opts.args) > 1 and per_recipient(opts.deliver):
        # One exit code answers for all: after a failure past the first
        # delivery, a tempfail delivers the first again, a success loses the rest.
        say(f"4.3.5 amavisd-client: {len(opts.args)} recipients in one call, but the "
            "delivery agent runs once a recipient and one exit code cannot answer for each "
            "(a retry would deliver twice): give one recipient a call (Sendmail mailer "
            "without F=m; Postfix pipe with TRANSPORT_destination_recipient_limit = 1)")
        return EX_TEMPFAIL
    spool = None
    conn = Connection(opts.socket, opts.timeout)
    try:
        spool = Spool(opts.tempbase)
        spool.write_from(0)  # first: a slow stdin must not idle our connection away
        spool.verify()
        conn.open()
        reply = check(conn, spool.path, opts.sender, opts.args)
        outcome = reply.get("return_value")
        if outcome in ("continue", "accept"):
            spool.verify()  # the verdict was on our file, not on one swapped in
            message = edit_message(spool.read(), header_edits(reply))
            return deliver(opts.deliver, opts.sender or "", opts.args, message)
        if outcome == "discard":
            return EX_OK
        fields = (reply.fields("setreply", 3) or [[]])[0]
        _, xcode, text = (fields + ["", "", ""])[:3]
        if outcome == "reject":
            say(f"{xcode or '5.7.0'} {text or 'rejected by amavisd'}")
            return EX_UNAVAILABLE
        say(f"{xcode or '4.5.0'} {text or 'amavisd could not check the message'}")
        return EX_TEMPFAIL
    except (ClientError, SpoolError) as err:
        say(f"4.5.0 amavisd-client: {err}")
        return EX_TEMPFAIL
    except OSError as err:
        say(f"4.3.0 amavisd-client: {err}")
        return EX_TEMPFAIL
    finally:
        conn.close()
        if spool is not None:
            spool.remove()


def say(text: str, stream=None) -> None:
    (stream or sys.stdout).write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        say(f"amavisd-client: {err}", stream=sys.stderr)
        say(USAGE.splitlines()[0], stream=sys.stderr)
        return EX_USAGE
    except SystemExit as exit_:
        say(str(exit_.code))
        return EX_OK
    if opts.sender is not None:
        return mailer_mode(opts)
    if not opts.args:
        opts.args = ["-"]
    return file_mode(opts)


if __name__ == "__main__":
    sys.exit(main())
