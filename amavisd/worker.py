"""A pre-forked worker: accept a connection, serve its requests, repeat.

Each listener carries a protocol tag; the worker builds that protocol's
session from `protocol.registry` with itself as the handler (the session
calls `handle_message`, `handle_release`, ...) and drives it with the one
blocking loop of `protocol.loop`. So the worker knows no protocol: a new
ingress is a registry row, not an edit here.

Workers accept nothing themselves: the master's doorman (`amavisd.doorman`)
accepts, keeps silent and trickling clients away from us, and passes each
connection whose request is whole (SMTP/LMTP: at once), with the index of
its listener, into one queue every idle worker waits on. A connection
taken from the queue is served, even by a worker asked to leave meanwhile;
a worker only takes one while it is alive.

One request at a time, so one stuck message stalls one worker only. The
worker touches its heartbeat while idle and when a request starts; the
master kills it if a request outlives `child_timeout`. Asked to abort
(SIGABRT), it first answers the request in flight with a tempfail, so the
client never sees a silent drop. It leaves with `os._exit()`: the master's
atexit hooks (python-daemon's among them) must not run in a child.

The temp base (clients spool there) and the work base (our own per-message
dirs) are re-created when they vanish under a running daemon: a worker
refuses to boot (and so halts the master) only for what was wrong at start;
later, while they cannot be made, requests are tempfailed and the master
stays up. They are checked once a request (and once a turn while idle): one
stat each while nothing changed since the last full check.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import random
import select
import signal
import socket
import stat
import time

from amavisd import failures, logs, metrics, wakeup
from amavisd.actions import smtpout
from amavisd.config import Config
from amavisd.doorman import handout
from amavisd.envelope import Job
from amavisd.heartbeat import Heartbeat
from amavisd.listeners import Listener, describe
from amavisd.pipeline import Pipeline
from amavisd.policy.banks import listener_keys
from amavisd.protocol import registry
from amavisd.protocol.loop import ConnectionLimits, send_last_words, serve
from amavisd.protocol.session import Session
from amavisd.quarantine.release import ReleaseOutcome, ReleaseRequest
from amavisd.quarantine.release import release as release_quarantined
from amavisd.verdict import Destiny, Result

log = logging.getLogger("amavisd.worker")

# Reserved exit codes the master understands.
EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_BOOT_ERROR = 3  # the master halts instead of respawning forever
EXIT_ABORTED = 4

TEMPBASE_MODE = 0o1770  # clients of the group spool here; sticky: none removes another's
WORK_BASE_MODE = 0o700  # ours alone
# Heartbeat touches closer together than this are one (several call sites
# follow each other within microseconds); the master polls far less often.
BEAT_SLACK = 0.05


class BootError(Exception):
    pass


class Worker:
    def __init__(self, age: int, generation: int, ppid: int, config: Config,
                 listeners: list[Listener], heartbeat: Heartbeat,
                 signal_mask: set[signal.Signals] | None = None,
                 queue: socket.socket | None = None):
        self.age = age
        self.queue = queue  # the doorman's: connections whose request is whole, one a message
        self.signal_mask = signal_mask  # restored once our handlers are in
        self.generation = generation
        self.ppid = ppid
        self.config = config
        self.listeners = listeners
        self.heartbeat = heartbeat
        self.alive = True
        self.requests = 0
        self.log_ids = 0
        self.session: Session | None = None  # of the connection being served
        self.interface_banks: tuple[str, ...] = ()  # interface_policy banks of its door
        self.connection_limits = ConnectionLimits.from_config(config)
        self.reopen_logs = False
        jitter = random.randint(0, config.max_requests_jitter) if config.max_requests else 0
        self.max_requests = config.max_requests + jitter if config.max_requests else 0
        self.pipeline: Pipeline | None = None
        self._wakeup_r = -1
        # The master's first workers: what is wrong for them was wrong at start.
        self.at_start = generation == 0 and age <= config.workers
        self.dirs_problem: str | None = None  # why requests are tempfailed, if they are
        self.pid = os.getpid()  # a worker is made in the forked child
        self.tempbase_path, self.work_base_path = config.tempbase_path, config.work_base_path
        self.dirs_seen: dict[str, tuple[int, ...]] = {}  # path -> stat key of its last good check
        self.door_keys: dict[Listener, tuple[str, ...]] = {}  # a listener's fixed banks keys
        self.beat_at = -1.0  # monotonic time of our last heartbeat touch

    # -- life cycle --------------------------------------------------------

    def run(self) -> None:
        """Never returns."""
        try:
            self.boot()
        except BootError as err:
            log.error("worker %d failed to boot: %s", os.getpid(), err)
            os._exit(EXIT_BOOT_ERROR)
        except Exception:
            log.exception("worker %d failed to boot", os.getpid())
            os._exit(EXIT_BOOT_ERROR)
        try:
            self.loop()
        except Exception:
            log.exception("worker %d crashed", os.getpid())
            os._exit(EXIT_CRASHED)
        smtpout.IDLE.expire(everything=True)  # QUIT, so the next hop logs no lost connection
        if self.pipeline is not None:
            try:
                self.pipeline.scanners.close()  # END clamd's kept session
            except Exception:  # noqa: BLE001 - leaving anyway; the kernel closes it
                log.debug("closing the scanners failed", exc_info=True)
        os._exit(EXIT_OK)

    def boot(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self.handle_exit)
        signal.signal(signal.SIGABRT, self.handle_abort)
        signal.signal(signal.SIGUSR1, self.handle_usr1)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # A signal writes a byte here (the C-level handler), waking select() at once.
        self._wakeup_r, _ = wakeup.open_pipe()
        if self.signal_mask is not None:
            # Signals the master sent since fork() were held back: they reach
            # the handlers above now (see Master.spawn_worker).
            signal.pthread_sigmask(signal.SIG_SETMASK, self.signal_mask)
        for listener in self.listeners:  # a tag no protocol answers to is a config error
            try:
                registry.session_class(listener.protocol)
            except registry.UnknownProtocol as err:
                raise BootError(f"listener {describe(listener)}: {err}") from None
        for listener in self.listeners:  # the doorman accepts; we keep only the tags
            if fixed_address(listener.sock):  # every connection's local address is the same
                self.door_keys[listener] = listener_keys(listener.sock)
            listener.close()
        self.ensure_dirs()
        if self.dirs_problem is not None and self.at_start:
            raise BootError(self.dirs_problem)
        self.at_start = False  # from now on, trouble with the dirs is not a boot error
        self.pipeline = Pipeline(self.config)
        # Our per-message dirs go to the work base even if it was missing just
        # now: ensure_dirs() re-creates it before every request.
        self.pipeline.spill_base = self.config.work_base_path

    def ensure_dirs(self) -> None:
        """Re-create a missing temp base or work base (we own the workdir) and
        check both; `dirs_problem` says what is wrong, None when all is well."""
        problem = (ensure_dir(self.tempbase_path, TEMPBASE_MODE, "temp base",
                              seen=self.dirs_seen)
                   or ensure_dir(self.work_base_path, WORK_BASE_MODE, "work base",
                                 private=True, seen=self.dirs_seen))
        if problem is None and self.dirs_problem is not None:
            log.info("worker %d: temp base and work base usable again", os.getpid())
        elif problem is not None and problem != self.dirs_problem and not self.at_start:
            log.error("worker %d: %s; tempfailing requests until it is fixed",
                      os.getpid(), problem)
        self.dirs_problem = problem

    def loop(self) -> None:
        idle = False  # boot() has just checked the dirs
        while self.alive:
            self.beat()
            if idle:  # a request checks them itself (check_message)
                self.ensure_dirs()
            smtpout.IDLE.expire()  # QUIT next-hop sessions idle too long
            if self.reopen_logs:
                self.reopen_logs = False
                logs.reopen()
            if os.getppid() != self.ppid:
                log.warning("worker %d: master went away, leaving", os.getpid())
                return
            try:
                ready, _, _ = select.select([self.queue, self._wakeup_r], [], [], 1.0)
            except OSError as err:
                if err.errno in (errno.EINTR, errno.EBADF):
                    continue
                raise
            if self._wakeup_r in ready:
                wakeup.drain(self._wakeup_r)
            idle = self.queue not in ready
            if idle or not self.alive:
                continue
            try:
                taken = self.take()
            except EOFError:
                log.warning("worker %d: master went away, leaving", os.getpid())
                return
            if taken is None:
                continue  # another worker took it
            conn, listener, first = taken
            keys = self.door_keys.get(listener) or listener_keys(conn)
            try:
                self.handle(conn, listener.protocol,
                            self.pipeline.policies.banks.for_listener(keys), first)
            except Exception:  # one connection's trouble must not cost the worker
                log.exception("worker %d: error serving a connection", os.getpid())

    def take(self) -> tuple[socket.socket, Listener, bytes] | None:
        """One connection from the doorman's queue, its listener and what the
        doorman read of its first request (b"": nothing, the socket has it
        all); None if another worker was quicker. EOFError: the master (the
        queue's other end) is gone (`doorman.handout.take`)."""
        taken = handout.take(self.queue)
        if taken is None:
            return None
        if not 0 <= taken.index < len(self.listeners):
            log.error("worker %d: a connection for unknown listener %d: closed",
                      os.getpid(), taken.index)
            os.close(taken.fd)
            return None
        listener = self.listeners[taken.index]
        # its listener's family and type: socket() need not ask the kernel
        return taken.connection(like=listener.sock), listener, taken.first

    def handle(self, conn: socket.socket, protocol: str, banks: tuple[str, ...] = (),
               first: bytes = b"") -> None:
        """Serve one accepted connection in the protocol its listener speaks;
        `banks`: the policy banks its listener loads (interface_policy, keyed
        by the address the client reached, as amavisd-new keys them); `first`:
        what the doorman read of its first request (the session starts from it)."""
        self.beat()
        self.interface_banks = banks
        metrics.connected(protocol)  # the ingress label of this connection's messages
        try:
            self.session = registry.session_class(protocol)(conn, self)
            serve(self.session, self.connection_limits, first)
        finally:
            self.session = None
            self.interface_banks = ()
            conn.close()
            metrics.worker_idle()

    # -- the handler: what sessions call (protocol.session.Handler) -------------

    def next_log_id(self) -> str:
        self.log_ids += 1
        return f"{self.pid}-{self.log_ids:02d}"

    def handle_message(self, job: Job) -> Result:
        metrics.worker_busy(job.log_id, job.envelope.queue_id)  # `amavisd status` shows it
        result = self.check_message(job)
        metrics.finished(result)  # counted before the reply: a kill after it loses nothing
        return result

    def check_message(self, job: Job) -> Result:
        self.beat()  # child_timeout counts from the start of the request
        self.requests += 1
        assert self.pipeline is not None
        self.ensure_dirs()
        if self.dirs_problem is not None:  # logged by ensure_dirs, with the path
            return Result(log_id=job.log_id, destiny=Destiny.TEMPFAIL,
                          tempfail_reason=self.dirs_problem,
                          public_reason=failures.LOCAL_PROBLEM)
        if self.interface_banks:
            job = dataclasses.replace(job, interface_banks=self.interface_banks)
        try:
            return self.pipeline.process(job)
        except Exception as err:  # a bug must tempfail the message, not lose it
            log.exception("(%s) internal error", job.log_id)
            return Result(log_id=job.log_id, destiny=Destiny.TEMPFAIL,
                          tempfail_reason=f"internal error: {type(err).__name__}",
                          public_reason=failures.INTERNAL_ERROR)

    def handle_release(self, name: ReleaseRequest, recipients: list[str],
                       log_id: str) -> ReleaseOutcome:
        self.beat()
        # The listener's banks apply (Debian's AM.PDP-SOCK bank sets auth_required_release)
        config = (self.pipeline.policies.config_for(self.interface_banks)
                  if self.pipeline is not None else self.config)
        return release_quarantined(config, name, recipients, log_id)

    def handle_reply_sent(self) -> None:
        """Notifications for the message just answered; never fatal."""
        self.beat()
        assert self.pipeline is not None
        try:
            self.pipeline.send_notices()
        except Exception:
            log.exception("sending notifications failed")

    def keep_going(self) -> bool:
        self.beat()
        metrics.worker_idle()  # the reply is out and the notices sent
        if self.max_requests and self.requests >= self.max_requests and self.alive:
            log.info("worker %d retiring after %d requests", os.getpid(), self.requests)
            self.alive = False
        return self.alive

    def others_waiting(self) -> bool:
        """Whether a client silent between requests should give its worker up
        (asked by the loop): connections wait in the doorman's queue that no
        idle worker has taken, or this worker was told to leave (a stop or a
        restart must not wait client_idle_timeout for a kept client)."""
        return not self.alive or handout.waiting(self.queue) > 0

    def beat(self) -> None:
        """Touch the heartbeat, unless we did less than BEAT_SLACK ago."""
        now = time.monotonic()
        if now - self.beat_at >= BEAT_SLACK:
            self.beat_at = now
            self.heartbeat.notify()

    # -- signals -------------------------------------------------------------

    def handle_exit(self, signum: int, frame: object) -> None:
        self.alive = False  # finish the request in flight, then leave

    def handle_usr1(self, signum: int, frame: object) -> None:
        self.reopen_logs = True

    def handle_abort(self, signum: int, frame: object) -> None:
        # Last words of a worker the master found stuck: the client must hear
        # "tempfail" rather than see the connection drop.
        if self.session is not None:
            send_last_words(self.session, failures.TIME_EXCEEDED)
        try:  # a line held for the forward's outcome (logs.HeldLine) is not lost
            logs.write_held("worker aborted after child_timeout")
        finally:
            os._exit(EXIT_ABORTED)


def ensure_dir(path: str, mode: int, what: str, private: bool = False,
               seen: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """Make `path` (with `mode`) if it is missing; what is wrong with it, or None.
    `private`: it must be ours alone (the work base), never open to clients.
    `seen`: the stat key of each path's last good check; a path whose stat
    still gives it (same inode, type and mode, owner and group) is not checked
    again: one stat, not four calls. (Not the ctime: every spool dir made or
    removed in the temp base moves it. What only access() would see, an ACL
    or a read-only remount, then shows when the dir is used, as a tempfail.)"""
    try:
        st = os.stat(path)  # an admin's symlink to the real dir is fine
    except FileNotFoundError:
        st = None
    except OSError as err:
        return f"{what} {path}: {err.strerror}"
    if seen is not None:
        if st is not None and seen.get(path) == _dir_key(st):
            return None
        seen.pop(path, None)  # checked in full below; kept again only if all is well
    if st is None:
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass  # made meanwhile (another worker)
        except OSError as err:
            return f"{what} {path} is missing and cannot be created: {err.strerror}"
        else:
            os.chmod(path, mode)  # mkdir's mode went through the umask
            log.warning("worker %d: %s %s was missing: re-created", os.getpid(), what, path)
        try:
            st = os.stat(path)
        except OSError as err:
            return f"{what} {path}: {err.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} {path} is not a directory"
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return f"{what} {path} is not readable and writable by uid {os.geteuid()}"
    if private and (st.st_uid != os.geteuid() or st.st_mode & 0o077):
        return (f"{what} {path} must be ours alone (uid {os.geteuid()}, mode 0700), "
                f"not uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):04o}")
    if seen is not None:
        seen[path] = _dir_key(st)
    return None


def _dir_key(st: os.stat_result) -> tuple[int, ...]:
    """What a directory's checks depend on, as stat shows it."""
    return (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid)


def fixed_address(sock: socket.socket) -> bool:
    """Whether every connection a listener accepts has the listener's own
    local address (a Unix socket, or TCP bound to one address), so the
    interface_policy keys can be found once rather than per connection."""
    if sock.family == socket.AF_UNIX:
        return True
    try:
        host = sock.getsockname()[0]
        return not ipaddress.ip_address(host.partition("%")[0]).is_unspecified
    except (OSError, ValueError, IndexError, TypeError):
        return False
