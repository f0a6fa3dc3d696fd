"""Running an external unpacker on hostile input, and nothing more.

Some formats have no well-kept Python reader (arj, lha, zoo, arc,
old rar, cab's LZX); for them a real tool runs, and it runs boxed in:
- argv list, never a shell; a minimal environment; stdin from /dev/null;
- its own session, so a timeout kills it and anything it forked;
- rlimits: CPU seconds, file size (no single file beyond the part allowance),
  address space, no core dumps;
- no network (`tool_network = "isolated"`, the default): a new user and
  network namespace, so only a loopback that is down; an unarchiver that
  was made to run hostile code cannot fetch more or call home. Defence in
  depth, so best effort: where the kernel or a sandbox refuses namespaces
  (a sysctl, AppArmor, systemd's RestrictNamespaces=) tools run with the
  host's network and that is logged once (`isolation_failure`), not
  failed closed on. Unix sockets reached by path stay reachable;
- a private 0700 directory as cwd and output dir, watched while it runs: when
  the bytes written there pass the budget's allowance the tool is killed;
- output read back by `members.harvest`, which never follows a link.
What the tool says on stdout/stderr is kept (bounded) for the log and for
format modules that parse listings. A tool that fails on a full disk (it
says so, or the work dir has no room left) raises WorkDirFailed: our
failure, a tempfail, never taken for a damaged archive.

Archives and compressors (a damaged stream read again by its tool, a big
.Z through gzip) both run tools, so this lives in decode/, beside both:
inside archives/ it made compressed.py import every archive module, one of
which (freeze) imports compressed.py.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from amavisd.decode.limits import LimitExceeded
from amavisd.decode.parts import Part, create_private
from amavisd.decode.registry import Context, WorkDirFailed

OUTPUT_LIMIT = 1024 * 1024  # bytes of stdout/stderr kept
DISK_FULL = ("No space left on device", "Disk quota exceeded")  # strerror(ENOSPC, EDQUOT)
LOW_SPACE = 64 * 1024  # free bytes under which a tool's failure is taken for a full disk
POLL = 0.02  # seconds between disk-use checks while a tool runs
ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
# unshare(2) flags: a user namespace lets an unprivileged process own the new
# network namespace (os.unshare is Python 3.12's; this is 3.11's way)
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NO_NETWORK = CLONE_NEWUSER | CLONE_NEWNET
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded now: the child must not dlopen

log = logging.getLogger("amavisd")
_isolation: dict[str, str | None] = {}  # "failure": why tools cannot be isolated, or None


@dataclass
class ToolResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    elapsed: float

    @property
    def text(self) -> str:
        return (self.stdout + self.stderr).decode("utf-8", "replace")

    def said(self, work: str, limit: int = 200) -> str:
        """What it said, on one line, our scratch paths left out (the text goes
        into UNCHECKED reasons, headers and logs; member names stay, cleaned
        by the reader of the reason)."""
        text = " ".join(self.text.replace(work.rstrip("/") + "/", "").split())
        return text[:limit]


@dataclass
class SevenZipReport:
    """What 7-Zip says about an extraction: its ERROR lines sorted into
    "CRC Failed" (the member was written whole, only its check failed) and
    the others (a member not written, or not all of it: unsupported method,
    data error, a path it refused), the encryption ones apart."""

    crc_failed: list[str]
    failed: list[str]
    wrong_password: list[str]

    @classmethod
    def read(cls, result: ToolResult, work: str) -> SevenZipReport:
        """`work`: the scratch dir, left out of the lines kept."""
        report = cls([], [], [])
        for line in result.text.splitlines():
            if not line.startswith("ERROR:"):
                continue
            line = line.replace(work.rstrip("/") + "/", "")
            if "Wrong password" in line or "Cannot open encrypted archive" in line:
                report.wrong_password.append(line)
            elif "CRC Failed" in line and "encrypted" not in line:
                report.crc_failed.append(line)
            else:
                report.failed.append(line)
        # exit 1 is a warning (data after the archive, say); 2 and up are errors
        if result.returncode >= 2 and not (report.crc_failed or report.failed
                                           or report.wrong_password):
            report.failed.append(f"7zz exit {result.returncode}")
        return report

    def said(self, limit: int = 200) -> str:
        """The failures on one line, else the CRC failures."""
        return " ".join(self.failed + self.wrong_password or self.crc_failed)[:limit]


def unshare(flags: int) -> int:
    """unshare(2); 0 or the errno. Safe between fork and exec."""
    if _LIBC.unshare(ctypes.c_int(flags)) == 0:
        return 0
    return ctypes.get_errno() or errno.EPERM


def isolation_failure() -> str | None:
    """Why tools cannot get their own network namespace here, or None if they
    can. Tried once per process, in a forked child, as the daemon's user (the
    master calls it after dropping root, so workers inherit the answer and it
    is logged once); a failure is logged as a warning."""
    if "failure" not in _isolation:
        pid = os.fork()
        if pid == 0:  # the child: nothing but the call, whatever happens
            try:
                code = unshare(NO_NETWORK)
            finally:
                os._exit(code if 0 <= code < 256 else errno.EPERM)  # noqa: B012
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        failure = None if code == 0 else (os.strerror(code) if code > 0 else f"signal {-code}")
        _isolation["failure"] = failure
        if failure:
            log.warning("external tools cannot be cut off from the network here "
                        "(unshare(CLONE_NEWUSER|CLONE_NEWNET): %s); they keep the host's "
                        "network (tool_network = \"isolated\" is best effort)", failure)
    return _isolation["failure"]


def available(tool: str) -> bool:
    return shutil.which(tool, path=ENV["PATH"]) is not None


def input_path(ctx: Context, part: Part, workdir: str, name: str = "input") -> str:
    """The part as a file an external tool can open: its spill file, or a copy.

    `name` matters to tools that look at the extension (unar, cabextract)."""
    if part.spill_path:
        return part.spill_path
    path = os.path.join(workdir, name)
    part.write_to(path)
    return path


def run_tool(ctx: Context, argv: list[str], cwd: str, watch: str | None = None,
             timeout: float | None = None, stdout: str | None = None) -> ToolResult:
    """Run `argv` in `cwd` under the limits; raise LimitExceeded when it
    writes more than the allowance under `watch` or runs out of time.
    `stdout`: a new file (put it under `watch`, so it is charged) that takes
    what the tool writes there, for a decompressor writing its output to it;
    the result's stdout is then empty."""
    allowance = max(ctx.budget.allowance(), 1)
    remaining = ctx.budget.remaining_time()
    limit = min(timeout or ctx.limits.tool_timeout, remaining)
    if limit <= 0:
        raise LimitExceeded(f"decoding took longer than {ctx.limits.max_time:g}s")
    cpu = max(1, int(limit) + 1)
    memory = ctx.limits.tool_memory
    # "isolated" unless the admin chose to inherit (or the kernel refuses)
    isolate = (getattr(ctx.limits, "tool_network", "isolated") == "isolated"
               and isolation_failure() is None)

    def confine() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (allowance, allowance))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.umask(0o077)
        if isolate:  # the probe succeeded; a failure now (namespaces used up) is not fatal
            unshare(NO_NETWORK)

    # never in cwd: a tool writing members there must not meet its own logs
    logs = tempfile.mkdtemp(prefix="log-", dir=ctx.workdir())
    out_path = stdout or os.path.join(logs, "stdout")
    err_path = os.path.join(logs, "stderr")
    started = time.monotonic()
    with create_private(out_path) as out, create_private(err_path) as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=ENV | {"HOME": cwd}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, close_fds=True, start_new_session=True,
                                preexec_fn=confine)
        over = ""
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed > limit:
                    over = f"{os.path.basename(argv[0])} ran longer than {limit:.1f}s"
                    break
                if watch is not None and disk_use(watch) > allowance:
                    over = f"{os.path.basename(argv[0])} output over {allowance} bytes"
                    break
                try:  # returns when the tool exits, not a poll later
                    proc.wait(timeout=POLL)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    result = ToolResult(proc.returncode, b"" if stdout else _read_head(out_path),
                        _read_head(err_path), time.monotonic() - started)
    shutil.rmtree(logs, ignore_errors=True)
    if over:
        raise LimitExceeded(over, scope="branch")
    if proc.returncode == -signal.SIGXFSZ:
        raise LimitExceeded(f"{os.path.basename(argv[0])} output file over {allowance} bytes",
                            scope="branch")
    if proc.returncode == -signal.SIGXCPU:
        raise LimitExceeded(f"{os.path.basename(argv[0])} used over {cpu}s of CPU",
                            scope="branch")
    if proc.returncode and _disk_full(cwd, result):  # ours, not the archive's: a tempfail
        raise WorkDirFailed(f"{os.path.basename(argv[0])} ran out of space in the work dir")
    return result


def _disk_full(path: str, result: ToolResult) -> bool:
    """Whether a tool that failed met a full disk: it says so (it may have
    removed its output since), or the work dir's file system has no room."""
    if any(message in result.text for message in DISK_FULL):
        return True
    try:
        fs = os.statvfs(path)
    except OSError:
        return True
    return fs.f_bavail * fs.f_frsize < LOW_SPACE


def disk_use(top: str) -> int:
    """Bytes in regular files under `top` (links not followed)."""
    total = 0
    stack = [top]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                except OSError:
                    continue
    return total


def _read_head(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(OUTPUT_LIMIT)
