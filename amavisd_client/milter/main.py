"""amavisd-milter: the command line.

    amavisd-milter --listen unix:/var/lib/amavis/amavisd-milter.sock \\
                   --daemon-socket /var/lib/amavis/amavisd.sock [--foreground]

Order of start-up, each step for a reason: read the settings (a bad one is
one line and exit 78); bind the listener as root (the socket gets its mode
and group before anyone can connect); detach unless --foreground; write the
pid file; drop root to the daemon's user (the daemon only reads spool files
that belong to its peer); then serve. TERM or INT: stop accepting, let
messages in flight finish (up to daemon_timeout, at most 30 s), exit 0.
systemd's NOTIFY_SOCKET gets READY=1 once the listener accepts, so an MTA
ordered after us never starts before the milter answers.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import logging.handlers
import os
import pwd
import signal
import socket
import sys

from amavisd_client.milter.options import OptionError, Settings, resolve
from amavisd_client.milter.server import ListenError, MilterServer, bind

log = logging.getLogger("amavisd.milter")

EX_OK, EX_SOFTWARE, EX_OSERR, EX_CONFIG = 0, 70, 71, 78
STOP_GRACE = 30.0


def setup_logging(target: str) -> None:
    root = logging.getLogger("amavisd.milter")
    root.setLevel(logging.INFO)
    root.propagate = False
    if target == "syslog" and os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(
            "/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(logging.Formatter("amavisd-milter[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s amavisd-milter[%(process)d]: %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    if target == "syslog" and not os.path.exists("/dev/log"):
        log.warning("no /dev/log: logging to stderr")


def resolve_user(user: str, group: str) -> tuple[int, int, str] | None:
    if not user:
        return None
    try:
        pw = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError:
        raise OptionError(f"no such user or group: {user!r} {group!r}") from None
    return pw.pw_uid, gid, pw.pw_name


def drop_root(who: tuple[int, int, str] | None) -> None:
    if os.geteuid() != 0:
        return
    if who is None:
        log.warning("running as root: set user (the daemon's, e.g. amavis) in [daemon] "
                    "or --user")
        return
    uid, gid, name = who
    os.setgroups([])
    os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError("still root after dropping privileges")


def detach() -> None:
    """The classic double fork: no controlling terminal, not a group leader."""
    if os.fork():
        os._exit(EX_OK)
    os.setsid()
    if os.fork():
        os._exit(EX_OK)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def write_pidfile(path: str) -> None:
    """Written as root, in a dir the milter's user may own (the LSB script
    gives /run/amavisd-milter to amavis): whatever that user left at the
    name (a hard link to a file of root's, a FIFO that would block the
    open) is unlinked, never opened, and a new file is made (O_EXCL)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")


def notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(b"READY=1")
    except OSError as err:
        log.warning("cannot notify systemd: %s", err)


async def serve(settings: Settings, sockets: list[socket.socket]) -> None:
    server = MilterServer(settings)
    await server.start(sockets)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # nothing to reload; keep running
    log.info("listening on %s, asking amavisd at %s", settings.listen, settings.daemon_socket)
    notify_ready()
    await stopping.wait()
    log.info("stopping")
    await server.stop(min(settings.daemon_timeout, STOP_GRACE))


def main(argv: list[str] | None = None) -> int:
    try:
        settings = resolve(sys.argv[1:] if argv is None else argv)
        who = resolve_user(settings.user, settings.group)
    except OptionError as err:
        print(f"amavisd-milter: {err}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(settings.log)
    try:
        owner = who[0] if who is not None and os.geteuid() == 0 else -1
        listener = bind(settings.listen, settings.socket_mode, settings.socket_group, owner)
    except ListenError as err:
        log.error("%s", err)
        print(f"amavisd-milter: {err}", file=sys.stderr)
        return EX_OSERR
    if not settings.foreground:
        detach()
    try:
        if settings.pidfile:
            write_pidfile(settings.pidfile)
        drop_root(who)
    except OSError as err:
        log.error("cannot start: %s", err)
        return EX_OSERR
    try:
        asyncio.run(serve(settings, [listener]))
    except Exception:
        log.exception("amavisd-milter failed")
        return EX_SOFTWARE
    finally:
        if settings.pidfile:
            try:
                os.unlink(settings.pidfile)
            except OSError:
                pass
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
