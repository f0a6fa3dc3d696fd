"""amavisd-client: hand one message to the amavisd daemon and act on its verdict.

Two uses:

  amavisd-client [options] FILE...
      Check message files; print one verdict line each.
  amavisd-client [options] -f SENDER [--] RECIPIENT...
      Sendmail mailer: the message comes on stdin; on a clean verdict it goes,
      with the daemon's header edits, to the local delivery agent (--deliver).

Exit codes (sysexits.h): 0 accepted/delivered (also for a discarded message
in mailer mode), 69 rejected, 75 on every doubt (daemon down, timeout,
scanner failure, no reply), 99 discarded (file mode), 64 usage; in mailer
mode a delivery agent's own exit code is passed on.

Start-up time is the point of this file: it imports only what Python has
loaded anyway (`_socket`, not `socket`; no argparse, getopt, re or
subprocess), and is installed to run with `python3 -I -S`.

In mailer mode the message is spooled before connecting (the daemon hangs
up connections idle for client_idle_timeout), and what is delivered is read
back from the spooled file's descriptor after checking that the spool is
still the one the daemon was told about (see spool.py): never bytes that
someone else put at the path.
"""

from __future__ import annotations

import _socket
import os
import sys

from amavisd_client.ampdp import Block, Decoder, encode_block
from amavisd_client.spool import Spool, SpoolError

EX_OK = 0
EX_USAGE = 64
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_DISCARD = 99

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
                        {recipient} (one call per recipient) are filled in
  -f SENDER             envelope sender: selects mailer mode (stdin)
  -q, --quiet           print nothing in file mode
""" % (DEFAULT_SOCKET, DEFAULT_TIMEOUT)  # noqa: UP031 (braces are literal here)


class ClientError(Exception):
    """Something kept us from getting a verdict: always a tempfail."""


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
    if is_tcp(opts.socket):
        if not opts.tempbase:
            raise ValueError("with a TCP socket, give --tempbase (the daemon's temp base)")
    else:
        opts.socket = os.path.abspath(opts.socket)
        opts.tempbase = opts.tempbase or os.path.join(os.path.dirname(opts.socket), "tmp")
    return opts


def is_tcp(address: str) -> bool:
    """host:port or [v6]:port; anything else is a Unix socket path."""
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and "/" not in address)


# -- talking to the daemon -------------------------------------------------------


class Connection:
    """One AM.PDP connection, reused for several requests while the daemon keeps it."""

    def __init__(self, address: str, timeout: float):
        self.address = address
        self.timeout = timeout
        self.sock = None
        self.decoder = Decoder()

    def _connect(self):
        try:
            if not is_tcp(self.address):
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                target = self.address
            else:
                host, _, port = self.address.rpartition(":")
                host = host.strip("[]")
                family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
                sock = _socket.socket(family, _socket.SOCK_STREAM)
                target = (host, int(port))
            sock.settimeout(self.timeout)
            sock.connect(target)
        except (OSError, ValueError) as err:
            raise ClientError(f"cannot connect to amavisd at {self.address}: {err}") from None
        return sock

    def open(self) -> None:
        """Connect now, so "daemon down" is the error a postmaster sees first."""
        if self.sock is None:
            self.sock = self._connect()
            self.decoder = Decoder()

    def _still_open(self) -> bool:
        """A retiring worker may have closed our idle connection; find out first."""
        try:
            self.sock.settimeout(0.0)
            return self.sock.recv(1, _socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(self.timeout)

    def request(self, attrs: list[tuple[str, object]]) -> Block:
        if self.sock is not None and not self._still_open():
            self.close()
        self.open()
        try:
            self.sock.sendall(encode_block(attrs))
            while True:
                data = self.sock.recv(65536)
                if not data:
                    raise ClientError("amavisd closed the connection without a verdict")
                blocks = self.decoder.feed(data)
                if blocks:
                    return blocks[0]
        except TimeoutError:
            self.close()
            raise ClientError(f"no verdict from amavisd within {self.timeout:g}s") from None
        except OSError as err:
            self.close()
            raise ClientError(f"amavisd connection failed: {err}") from None
        except ClientError:
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def angle(address: str) -> str:
    address = address.strip()
    return address if address.startswith("<") and address.endswith(">") else f"<{address}>"


def check(conn: Connection, mail_file: str, sender: str | None,
          recipients: list[str]) -> Block:
    attrs: list[tuple[str, object]] = [
        ("request", "AM.PDP"),
        ("tempdir", os.path.dirname(mail_file)),
        ("tempdir_removed_by", "client"),
        ("mail_file", mail_file),
        ("delivery_care_of", "client"),
        ("protocol_name", "LOCAL"),
    ]
    if sender is not None:
        attrs.append(("sender", angle(sender)))
    attrs.extend(("recipient", angle(r)) for r in recipients)
    return conn.request(attrs)


# -- spooling -----------------------------------------------------------------------


def inside(path: str, base: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(base)
    parent = os.path.dirname(real)
    return parent != base and parent.startswith(base + os.sep)


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
            return deliver(opts, spool.read(), header_edits(reply))
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


# -- delivery --------------------------------------------------------------------------------


def header_edits(reply: Block) -> list[tuple[str, list[str]]]:
    """Header edits in the order a milter MTA applies them: delete, change, insert, add."""
    field_counts = {"delheader": 2, "chgheader": 3, "insheader": 3, "addheader": 2}
    return [(name, fields) for name, count in field_counts.items()
            for fields in reply.fields(name, count)]


def apply_edits(header: bytes, edits: list[tuple[str, list[str]]]) -> bytes:
    """Apply AM.PDP header edits (milter semantics) to a raw header block."""
    eol = b"\r\n" if header.find(b"\r\n") >= 0 else b"\n"
    lines = header.split(eol)
    if lines and lines[-1] == b"":
        lines.pop()
    mbox_from = lines.pop(0) if lines and lines[0].startswith(b"From ") else None
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])

    def field_name(field: list[bytes]) -> bytes:
        return field[0].split(b":", 1)[0].strip().lower()

    def nth(name: str, index: int) -> int | None:
        seen = 0
        for pos, field in enumerate(fields):
            if field_name(field) == name.lower().encode():
                seen += 1
                if seen == index:
                    return pos
        return None

    def make(name: str, value: str) -> list[bytes]:
        return [f"{name}: {value}".encode("utf-8", "surrogateescape")]

    for op, args in edits:
        try:
            if op == "insheader" and len(args) == 3:
                fields.insert(max(0, min(int(args[0]), len(fields))), make(args[1], args[2]))
            elif op == "addheader" and len(args) == 2:
                fields.append(make(args[0], args[1]))
            elif op == "chgheader" and len(args) >= 2:
                pos = nth(args[1], int(args[0]))
                value = args[2] if len(args) == 3 else ""
                if pos is not None:
                    if value:
                        fields[pos] = make(args[1], value)
                    else:
                        del fields[pos]
                elif value:
                    fields.append(make(args[1], value))
            elif op == "delheader" and len(args) == 2:
                pos = nth(args[1], int(args[0]))
                if pos is not None:
                    del fields[pos]
        except ValueError:
            continue  # a malformed index: ignore the edit, as the protocol asks
    out = [mbox_from] if mbox_from is not None else []
    for field in fields:
        out.extend(field)
    return eol.join(out) + eol


def delivery_argvs(template: str, sender: str, recipients: list[str]) -> list[list[str]]:
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


def deliver(opts: Options, data: bytes, edits: list[tuple[str, list[str]]]) -> int:
    """Hand `data` (as spooled and scanned), with the header edits, to the agent."""
    split = _header_end(data)
    message = apply_edits(data[:split], edits) + data[split:] if edits else data
    sender = opts.sender or ""
    worst = EX_OK
    for argv in delivery_argvs(opts.deliver, sender, opts.args):
        code = run_agent(argv, message)
        if code != EX_OK:
            worst = code
    return worst


def _header_end(data: bytes) -> int:
    """Offset just past the header block (its lines, without the empty line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        pos = data.find(sep)
        if pos >= 0:
            return pos + len(sep) // 2
    return len(data)


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
