"""The master (arbiter): keeps N workers alive on the shared sockets.

One verb a method: `spawn_worker`, `reap_workers`, `murder_workers`,
`manage_workers`. Signal handlers only enqueue (the wakeup fd gets the
byte); the main loop drains the queue and calls `handle_<signal>()`.

- TERM/INT: graceful stop; in-flight messages get `graceful_timeout`.
- QUIT: quick stop.
- HUP: re-read the config, start a new generation of workers, then retire
  the old one. The listening sockets stay open throughout, so a connection
  waits in the backlog instead of being refused.
- USR1: reopen logs (and tell the workers to); a log file that cannot be
  reopened is logged and survived.
Workers accept nothing: the doorman (`amavisd.doorman`, a thread of this
process) accepts and hands them only connections whose request is whole, so
silent or trickling clients cannot hold the workers; it is restarted if it
dies of a bug.
A worker that exits with the boot-error code before any worker has booted
halts the master (exit 78): what was wrong at start would only fail again,
as fast as the loop turns. Once workers have booted and served, the same
failure (the temp base removed at run time, say) is a fault of the moment:
the master stays up and respawns with a doubling back-off, so there is no
storm. Any other exception in the master is a bug: it is logged, the
sockets are closed and the workers stopped, and the master exits 70
(EX_SOFTWARE) instead of leaving orphans behind.

Each worker is in one explicit state (`WorkerState`, in supervisor's
manner), and every change of state goes through `transition()`, which logs
it at debug level:

    BOOTING --heartbeat moved--> SERVING
    BOOTING/SERVING --past child_timeout, ABRT--> ABORTING --ABORT_GRACE, KILL--> KILLED
    BOOTING/SERVING/ABORTING --TERM (HUP, surplus)--> RETIRING --graceful_timeout--> KILLED
    BOOTING/SERVING/ABORTING --TERM or QUIT (master stopping)--> STOPPING --grace--> KILLED
    any --reaped--> EXITED (and forgotten)

Workers the master counts towards `workers` are those of the current
generation that are BOOTING, SERVING or ABORTING: a stuck worker is
replaced once it is killed, a retiring one at once. A retiring worker that
exits with an error is not worth a warning: it was asked to leave.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import shutil
import signal
import time
from dataclasses import dataclass
from enum import Enum

from amavisd import config as configuration
from amavisd import logs, sdnotify, sysexits, wakeup
from amavisd.actions.notify import load_templates, template_dirs
from amavisd.config import Config, ConfigError
from amavisd.doorman import Doorman
from amavisd.heartbeat import Heartbeat
from amavisd.listeners import Listener, describe, unlink_if_ours
from amavisd.observe import exporter
from amavisd.quarantine import open_store
from amavisd.worker import EXIT_BOOT_ERROR, Worker

log = logging.getLogger("amavisd.master")

ABORT_GRACE = 5.0  # seconds between ABRT and KILL for a stuck worker
EXIT_HALTED = 78  # EX_CONFIG: systemd's RestartPreventExitStatus keeps it down
EXIT_BUG = sysexits.EX_SOFTWARE  # an exception in the master itself
RESPAWN_BACKOFF_FIRST = 1.0  # seconds before respawning after a run-time boot failure
RESPAWN_BACKOFF_MAX = 30.0  # doubling up to this

SIGNAL_NAMES = {
    signal.SIGHUP: "hup",
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGUSR1: "usr1",
    signal.SIGCHLD: "chld",
}

# What the master sends its workers: blocked across fork() (see spawn_worker).
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
                  signal.SIGABRT, signal.SIGHUP}

# Settings that only a restart can change (the sockets are bound before dropping root).
RESTART_ONLY = ("workdir", "socket", "socket_mode", "socket_owner", "socket_group",
                "tcp_listen", "smtp_listen", "smtp_listen_remote", "user", "group", "pidfile",
                "daemon", "metrics_listen", "metrics_dir")


class Halt(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class WorkerState(Enum):
    BOOTING = "booting"  # forked; its heartbeat has not moved yet
    SERVING = "serving"  # booted: accepting connections
    ABORTING = "aborting"  # stuck past child_timeout: sent ABRT, answering tempfail
    RETIRING = "retiring"  # sent TERM: finishing its request, then leaving
    STOPPING = "stopping"  # the master is stopping: sent TERM (graceful) or QUIT
    KILLED = "killed"  # sent KILL: waiting to be reaped
    EXITED = "exited"  # reaped: forgotten


# What counts towards `workers` (see the module docstring).
COUNTED = (WorkerState.BOOTING, WorkerState.SERVING, WorkerState.ABORTING)


@dataclass
class WorkerProcess:
    pid: int
    age: int
    generation: int
    heartbeat: Heartbeat
    born: float = 0.0  # the heartbeat's mtime at fork: the worker's first touch moves it
    booted: bool = False  # a fact, whatever the state: its heartbeat moved once
    state: WorkerState = WorkerState.BOOTING
    since: float = 0.0  # monotonic time of the last transition


def transition(worker: WorkerProcess, state: WorkerState, why: str) -> None:
    """The one place a worker changes state; logged, so a worker's life can be followed."""
    log.debug("worker %d: %s -> %s (%s)", worker.pid, worker.state.value, state.value, why)
    worker.state = state
    worker.since = time.monotonic()


class Arbiter:
    def __init__(self, config: Config, listeners: list[Listener],
                 config_path: str | None = None, overrides: dict | None = None,
                 log_to_stderr: bool | None = None):
        self.config = config
        self.listeners = listeners
        self.config_path = config_path
        self.overrides = overrides or {}
        self.log_to_stderr = log_to_stderr
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 0
        self.worker_age = 0
        self.signal_queue: list[int] = []
        self.stopping = False
        self.ever_booted = False  # a worker reached its accept loop: we have served
        self.boot_failures = 0  # in a row, since the last worker that booted
        self.spawn_after = 0.0  # monotonic time before which no worker is forked
        self._wakeup_r = self._wakeup_w = -1
        self.doorman = Doorman(listeners, config.client_idle_timeout,
                               config.max_pending_connections, config.request_timeout)

    # -- main loop -----------------------------------------------------------

    def run(self) -> int:
        self.install_signals()
        exporter.start(self)  # /metrics, /healthz, /status: a thread beside this loop
        log.info("amavisd master %d starting %d workers on %s", os.getpid(),
                 self.config.workers, ", ".join(describe(s) for s in self.listeners))
        try:
            self.doorman.start()
            self.manage_workers()
            sdnotify.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving")
            while True:
                self.sleep(1.0)
                while self.signal_queue:
                    name = SIGNAL_NAMES[self.signal_queue.pop(0)]
                    getattr(self, f"handle_{name}")()
                self.doorman.watch()
                self.reap_workers()
                self.watch_boots()
                self.murder_workers()
                self.manage_workers()
        except Halt as halt:
            if halt.code:
                log.error("halting: %s", halt.reason)
            else:
                log.info("%s", halt.reason)
            self.stop(graceful=halt.code == 0)
            return halt.code
        except Exception:
            log.exception("master %d: internal error; stopping", os.getpid())
            try:
                self.stop(graceful=True)
            except Exception:
                log.exception("master %d: error while stopping", os.getpid())
            return EXIT_BUG

    def install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = wakeup.open_pipe()
        for signum in SIGNAL_NAMES:
            signal.signal(signum, self.enqueue_signal)

    def enqueue_signal(self, signum: int, frame: object) -> None:
        self.signal_queue.append(signum)  # nothing else: no I/O, no logging, no locks

    def sleep(self, timeout: float) -> None:
        if self.signal_queue:
            return
        try:
            ready, _, _ = select.select([self._wakeup_r], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            wakeup.drain(self._wakeup_r)

    # -- signal handlers (called from the loop, not from the signal) -----------

    def handle_term(self) -> None:
        raise Halt(0, "TERM: graceful stop")

    def handle_int(self) -> None:
        raise Halt(0, "INT: graceful stop")

    def handle_quit(self) -> None:
        self.stop(graceful=False)
        raise Halt(0, "QUIT: quick stop")

    def handle_chld(self) -> None:
        pass  # reap_workers runs on every turn of the loop

    def handle_usr1(self) -> None:
        failures = logs.reopen()  # never raises; failures are logged where it still can
        self.signal_workers(signal.SIGUSR1)
        if failures:
            log.warning("USR1: logs reopened, %d target(s) kept their old file", len(failures))
        else:
            log.info("USR1: logs reopened")

    def handle_hup(self) -> None:
        try:
            new = configuration.load(self.config_path, self.overrides)
            open_store(new)  # a bad quarantine_store URL must not reach the workers
        except (ConfigError, OSError, ValueError) as err:  # a typo must not stop the mail
            log.error("HUP: reload failed, keeping the running configuration: %s", err)
            return
        new = new.replace(myhostname=new.hostname)
        changed = [k for k in RESTART_ONLY if new[k] != self.config[k]]
        if changed:
            log.warning("HUP: %s changed; that takes a restart, not a reload",
                        ", ".join(changed))
            new = new.replace(**{k: self.config[k] for k in changed})
        sdnotify.notify("RELOADING=1")
        load_templates(*template_dirs(new))  # the new workers inherit what was read
        try:
            logs.setup(new, stderr=self.log_to_stderr)
        except OSError as err:
            log.error("HUP: cannot open the new log targets (%s); keeping the old ones", err)
        self.config = new
        self.doorman.configure(new.client_idle_timeout, new.max_pending_connections,
                               new.request_timeout)
        self.generation += 1
        self.manage_workers()  # the new generation first: never a moment without workers
        for worker in list(self.workers.values()):
            if worker.generation < self.generation and worker.state in COUNTED:
                self.retire_worker(worker, "HUP: old generation")
        sdnotify.notify("READY=1\nSTATUS=serving")
        log.info("HUP: configuration reloaded, worker generation %d", self.generation)

    # -- workers -----------------------------------------------------------------

    def manage_workers(self) -> None:
        if self.stopping:
            return
        current = [w for w in self.workers.values()
                   if w.generation == self.generation and w.state in COUNTED]
        for _ in range(self.config.workers - len(current)):
            if time.monotonic() < self.spawn_after:
                break  # backing off after workers that failed to boot
            try:
                self.spawn_worker()
            except OSError as err:  # fork or the heartbeat file: EAGAIN, ENOMEM, ENOSPC
                log.error("cannot spawn a worker: %s", err)
                self.back_off()
                break
        surplus = len(current) - self.config.workers
        for worker in sorted(current, key=lambda w: w.age)[:max(0, surplus)]:
            self.retire_worker(worker, "more workers than configured")

    def retire_worker(self, worker: WorkerProcess, why: str) -> None:
        """Ask a worker to finish its request and leave (TERM)."""
        transition(worker, WorkerState.RETIRING, why)
        self.kill_worker(worker.pid, signal.SIGTERM)

    def spawn_worker(self) -> int:
        self.worker_age += 1
        heartbeat = Heartbeat()
        # Read before the fork: read after it, a child that beats before the
        # parent gets there leaves born == its first beat, so its heartbeat
        # never "moves" and it shows as starting until it beats again (not
        # while it waits on a stalled scanner).
        born = heartbeat.last_update()
        # Until the child has its own handlers, a signal would run the master's
        # (inherited) enqueue_signal and be lost: a USR1 or TERM sent right
        # after the fork. Blocked here, it stays pending until Worker.boot().
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        # Frozen, what the worker inherits is out of its collections: they
        # never write to those objects' GC headers, so a full collection
        # neither copies their pages (measured: +6 MiB of private memory a
        # worker without this) nor walks them. The master thaws at once and
        # keeps collecting its own garbage.
        gc.freeze()
        try:
            with self.doorman.forking():
                pid = os.fork()
        except BaseException:
            gc.unfreeze()
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
            raise
        if pid:
            gc.unfreeze()
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
            self.workers[pid] = WorkerProcess(pid, self.worker_age, self.generation, heartbeat,
                                              born=born, since=time.monotonic())
            log.info("worker %d spawned (generation %d)", pid, self.generation)
            return pid
        # In the child: forget everything that belongs to the master.
        try:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            self.doorman.forget_in_child()
            for other in self.workers.values():
                other.heartbeat.close()
            Worker(self.worker_age, self.generation, os.getppid(), self.config,
                   self.listeners, heartbeat, unblocked, self.doorman.queue).run()
        finally:
            os._exit(1)

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            worker.heartbeat.close()
            self.remove_work_of(pid)
            code = os.waitstatus_to_exitcode(status)
            exporter.reaped(worker, code)  # counts its exit, folds its metric files
            retiring = worker.state is WorkerState.RETIRING
            transition(worker, WorkerState.EXITED, f"exit status {code}")
            if code == EXIT_BOOT_ERROR:
                if not self.ever_booted:
                    raise Halt(EXIT_HALTED, f"worker {pid} failed to boot (see above); "
                               "not respawning")
                delay = self.back_off()
                log.error("worker %d failed to boot (see above); respawning in %gs",
                          pid, delay)
                continue
            if code < 0:
                log.error("worker %d killed by %s", pid, signal.Signals(-code).name)
                self.sweep_quarantine()
            elif code and not retiring:
                log.warning("worker %d exited with status %d", pid, code)
            else:
                log.info("worker %d exited", pid)

    def sweep_quarantine(self) -> None:
        """A worker killed while quarantining leaves a message without its sidecar."""
        try:
            store = open_store(self.config)
            removed = store.sweep_incomplete() if hasattr(store, "sweep_incomplete") else []
        except Exception as err:  # noqa: BLE001 - the master must not die of a sweep
            log.warning("cannot sweep the quarantine: %s", err)
            return
        for name in removed:
            log.warning("removed %s from the quarantine: its worker died storing it", name)

    def remove_work_of(self, pid: int) -> None:
        """A worker killed mid-message leaves its per-message dirs behind (named
        amavisd-<pid>-*, decode.registry): nobody else will ever remove them."""
        base = self.config.work_base_path
        try:
            names = [n for n in os.listdir(base) if n.startswith(f"amavisd-{pid}-")]
        except OSError:
            return
        for name in names:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)

    def watch_boots(self) -> None:
        """A worker whose heartbeat moved since the fork has booted: from then
        on a boot failure is respawned (with back-off), not a reason to halt."""
        for worker in self.workers.values():
            if worker.booted:
                continue
            try:
                moved = worker.heartbeat.last_update() != worker.born  # the clock may go back
            except OSError:
                continue
            if moved:
                worker.booted = self.ever_booted = True
                self.boot_failures, self.spawn_after = 0, 0.0
                if worker.state is WorkerState.BOOTING:
                    transition(worker, WorkerState.SERVING, "heartbeat moved")

    def back_off(self) -> float:
        """Hold further spawns for a doubling delay; returns it."""
        self.boot_failures += 1
        delay = min(RESPAWN_BACKOFF_MAX, RESPAWN_BACKOFF_FIRST * 2 ** (self.boot_failures - 1))
        self.spawn_after = time.monotonic() + delay
        return delay

    def murder_workers(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            state = worker.state
            if state is WorkerState.RETIRING:
                if now - worker.since > self.config.graceful_timeout:
                    log.error("worker %d did not finish within graceful_timeout; killing",
                              worker.pid)
                    self.kill_hard(worker, "graceful_timeout")
            elif state is WorkerState.ABORTING:
                if now - worker.since > ABORT_GRACE:
                    log.error("worker %d ignored SIGABRT: killing", worker.pid)
                    self.kill_hard(worker, "ABRT ignored")
            elif state in (WorkerState.BOOTING, WorkerState.SERVING):
                if worker.heartbeat.age() > self.config.child_timeout:
                    log.error("worker %d stuck for more than child_timeout (%gs): aborting",
                              worker.pid, self.config.child_timeout)
                    transition(worker, WorkerState.ABORTING, "past child_timeout")
                    self.kill_worker(worker.pid, signal.SIGABRT)

    def kill_hard(self, worker: WorkerProcess, why: str) -> None:
        transition(worker, WorkerState.KILLED, why)
        self.kill_worker(worker.pid, signal.SIGKILL)

    def kill_worker(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def signal_workers(self, sig: int) -> None:
        for pid in list(self.workers):
            self.kill_worker(pid, sig)

    # -- stopping ---------------------------------------------------------------

    def stop(self, graceful: bool = True) -> None:
        if self.stopping:
            return
        self.stopping = True
        sdnotify.notify("STOPPING=1")
        unix_paths = [listener.unix_path for listener in self.listeners if listener.unix_path]
        self.doorman.stop()  # before the listeners close: it polls them
        for listener in self.listeners:
            listener.close()
        for path in unix_paths:  # new clients now fail fast and their MTA retries
            unlink_if_ours(path)
        for worker in list(self.workers.values()):
            if worker.state in COUNTED:
                transition(worker, WorkerState.STOPPING, "master stopping")
        self.signal_workers(signal.SIGTERM if graceful else signal.SIGQUIT)
        self.doorman.hang_up_queued()  # no worker takes them now: their clients retry
        deadline = time.monotonic() + (self.config.graceful_timeout if graceful else 2.0)
        while self.workers and time.monotonic() < deadline:
            try:
                self.reap_workers()
            except Halt:
                pass
            time.sleep(0.05)
        for worker in list(self.workers.values()):
            log.error("worker %d still busy at the end of the grace period: killing",
                      worker.pid)
            self.kill_hard(worker, "end of the grace period")
        while self.workers:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            worker = self.workers.pop(pid, None)
            if worker:
                worker.heartbeat.close()
                transition(worker, WorkerState.EXITED,
                           f"exit status {os.waitstatus_to_exitcode(status)}")
        self.doorman.close()
        exporter.stop()

