"""Least privilege, checked on the running processes and the files they made.

The real daemon starts as root under `setpriv` with exactly the capability
bounding set and no_new_privs of init/amavisd.service (so a root phase that
needs more than the unit grants fails here), drops to `amavisd-test`, and
scans a clean mail, an EICAR (quarantined), an ARJ with EICAR (a real
external tool) and an LHA bomb that keeps the real `lhasa` writing until its
RLIMIT_FSIZE kills it. While lhasa runs, the test reads /proc/<tool>/: its
uid, capabilities, limits and network namespace. Then every entry under the
daemon's workdir and quarantine is walked for modes.

The external-tool box is also tested alone (`run_tool` as the daemon's user,
in a forked child): a tool replaced by a fake (`python3 -c`, named FAKE_TOOL)
cannot reach a TCP listener or an abstract Unix socket the test opened, and
the control with `tool_network = "inherit"` does reach them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd import privileges
from amavisd.decode import external
from amavisd.decode.limits import Limits
from amavisd.decode.registry import Context
from amavisd.testing import archivers
from amavisd.testing.eicar import EICAR
from amavisd.testing.messages import clean_message, eicar_message
from tests.integration.test_trust_boundary import (  # noqa: F401 (accounts: a fixture)
    DAEMON_USER,
    GROUP,
    accounts,
    archive_message,
    as_user,
    scan_as,
)
from tests.rigs.daemon import ROOT, DaemonInstance, children
from tests.rigs.mailboxes import ensure_group
from tests.rigs.milter import MilterInstance

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")]

BOMB = "archives/bombs/lhasa__morphos_lha_2717__h2_huge.lzh"
CORPUS = Path(os.environ.get("AMAVISD_CORPUS", Path(ROOT).parent / "shared" / "corpus"))
UNIT = Path(ROOT) / "init" / "amavisd.service"
FAKE_TOOL = "/usr/bin/python3"  # a stand-in for an unpacker: it only tries the network


def unit_caps(unit: Path) -> list[str]:
    [caps] = [line.split("=", 1)[1].split() for line in unit.read_text().splitlines()
              if line.startswith("CapabilityBoundingSet=")]
    return caps


def setpriv_args(unit: Path) -> list[str]:
    """setpriv's options for the unit's bounding set and NoNewPrivileges=yes."""
    bounding = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in unit_caps(unit))
    return ["--inh-caps=-all", f"--bounding-set={bounding}", "--no-new-privs",
            sys.executable, "-m", "amavisd"]


def status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/PID/limits: name -> (soft, hard)."""
    rows = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {row[:26].strip(): tuple(row[26:].split()[:2]) for row in rows}


def descendants(pid: int) -> set[int]:
    found, stack = set(), [pid]
    while stack:
        for child in children(stack.pop()):
            found.add(child)
            stack.append(child)
    return found


def identity(pid: int) -> dict[str, object]:
    info = status(pid)
    return {"uid": set(info["Uid"].split()), "gid": set(info["Gid"].split()),
            "caps": {info[k] for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")},
            "net": os.readlink(f"/proc/{pid}/ns/net")}


def watch_tools(daemon: DaemonInstance, name: str, seen: dict, stop: threading.Event) -> None:
    """Record the first live `name` process under the master: identity and limits."""
    while not stop.is_set() and not seen:
        for pid in descendants(daemon.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    seen.update(identity(pid), limits=limits(pid), pid=pid)
                    return
            except OSError:
                continue  # gone already
        time.sleep(0.003)


@pytest.fixture(scope="module")
def observed(clamd_nodecomp, accounts):  # noqa: F811 (the imported fixture)
    """One daemon, started as the unit would, after its messages: what was seen."""
    for fmt in ("arj", "lha"):
        if archivers.available(fmt):
            pytest.skip(archivers.available(fmt))
    if not shutil.which("setpriv") or not shutil.which("lhasa"):
        pytest.skip("needs setpriv (util-linux) and lhasa")
    if not (CORPUS / BOMB).is_file():
        pytest.skip(f"corpus not found at {CORPUS} (set AMAVISD_CORPUS)")
    top = Path(tempfile.mkdtemp(prefix="amlp", dir="/tmp"))
    top.chmod(0o755)  # the daemon's user walks through it to its workdir
    daemon = DaemonInstance(top / "d", clamd_nodecomp.address, workers=2,
                            python="/usr/bin/setpriv", python_args=setpriv_args(UNIT),
                            user=DAEMON_USER, group=GROUP)
    user = accounts["daemon"]
    try:
        daemon.start()
        mails = {"clean": clean_message(), "virus": eicar_message(),
                 "arj": archive_message("arj", archivers.build("arj", {"eicar.com": EICAR}, top)),
                 "bomb": archive_message("lha", (CORPUS / BOMB).read_bytes())}
        for name, raw in mails.items():
            path = top / f"{name}.eml"
            path.write_bytes(raw)
            path.chmod(0o644)
        codes = {name: scan_as(user, daemon, top / f"{name}.eml")
                 for name in ("clean", "virus", "arj")}
        seen: dict = {}
        stop = threading.Event()
        watcher = threading.Thread(target=watch_tools, args=(daemon, "lhasa", seen, stop))
        watcher.start()
        try:
            codes["bomb"] = scan_as(user, daemon, top / "bomb.eml")
        finally:
            stop.set()
            watcher.join()
        pids = [daemon.pid, *daemon.worker_pids()]
        yield {"daemon": daemon, "user": user, "codes": codes, "tool": seen,
               "processes": {pid: identity(pid) for pid in pids},
               "modes": walk_modes(daemon), "log": daemon.log_text()}
    finally:
        daemon.stop()
        shutil.rmtree(top, ignore_errors=True)


def walk_modes(daemon: DaemonInstance) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under the daemon's workdir and quarantine, and its log file:
    path -> (mode, uid, gid, kind)."""
    found = {}
    roots = [daemon.settings["workdir"], daemon.settings["quarantine_dir"]]
    for top in roots:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [""] + dirnames + filenames:
                path = os.path.join(dirpath, name) if name else dirpath
                try:
                    info = os.lstat(path)
                except FileNotFoundError:
                    continue  # a message's dir, removed while we looked
                kind = ("dir" if stat.S_ISDIR(info.st_mode) else "socket"
                        if stat.S_ISSOCK(info.st_mode) else "file")
                found[path] = (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, kind)
    info = os.stat(daemon.log_path)
    found[str(daemon.log_path)] = (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, "file")
    return found


# -- the processes -------------------------------------------------------------------


def test_the_unit_s_bounding_set_is_enough_and_the_mail_was_checked(observed):
    log = observed["log"]
    assert observed["codes"]["clean"] == 0, log[-3000:]
    assert log.count("Blocked INFECTED") == 2, log[-3000:]  # the EICAR and the ARJ's
    assert "quarantine: virus-" in log
    # the bomb: lhasa killed by its file-size limit, the mail UNCHECKED, never CLEAN
    assert "lhasa output file over" in log, log[-3000:]
    assert observed["codes"]["bomb"] != 0
    assert "Traceback" not in log, log[-3000:]


def test_master_and_workers_run_as_the_user_with_no_capabilities(observed):
    user = observed["user"]
    assert len(observed["processes"]) == 3  # the master and its two workers
    for pid, seen in observed["processes"].items():
        assert seen["uid"] == {str(user.pw_uid)}, (pid, seen)
        assert seen["gid"] == {str(user.pw_gid)}, (pid, seen)
        assert seen["caps"] == {"0000000000000000"}, (pid, seen)


def test_a_running_external_tool_is_boxed(observed):
    tool, user = observed["tool"], observed["user"]
    assert tool, "lhasa was never seen running"
    assert tool["uid"] == {str(user.pw_uid)} and tool["caps"] == {"0000000000000000"}, tool
    master_net = observed["processes"][observed["daemon"].pid]["net"]
    assert tool["net"] != master_net, "the tool shares the daemon's network namespace"
    lim = tool["limits"]
    assert lim["Max core file size"] == ("0", "0")
    assert lim["Max address space"] == (str(1024 ** 3),) * 2  # tool_memory
    soft_cpu = int(lim["Max cpu time"][0])
    assert 1 <= soft_cpu <= 31  # tool_timeout (30 s) + 1
    fsize = int(lim["Max file size"][0])
    assert 0 < fsize <= 100 * 1024 * 1024  # the expansion allowance, not unlimited


# -- the files -------------------------------------------------------------------


def test_the_socket_and_dirs_have_their_modes_and_owner(observed):
    daemon, user, modes = observed["daemon"], observed["user"], observed["modes"]
    config = daemon.config
    expect = {config.socket_path: 0o660, config.tempbase_path: 0o1770,
              config.work_base_path: 0o700, daemon.settings["workdir"]: 0o750,
              daemon.settings["quarantine_dir"]: 0o700, str(daemon.log_path): 0o640}
    for path, mode in expect.items():
        assert modes[path][:3] == (mode, user.pw_uid, user.pw_gid), (path, oct(modes[path][0]))
    quarantined = [p for p in modes if p.startswith(daemon.settings["quarantine_dir"] + "/")]
    assert quarantined and all(modes[p][0] == 0o600 and modes[p][1] == user.pw_uid
                               for p in quarantined), {p: oct(modes[p][0]) for p in quarantined}


def test_nothing_under_the_workdir_or_quarantine_is_open_to_others(observed):
    """No entry readable, writable or searchable by others; group write only
    where the daemon's group must write: the socket and the sticky temp base."""
    daemon, user, modes = observed["daemon"], observed["user"], observed["modes"]
    group_writable = {daemon.config.socket_path, daemon.config.tempbase_path}
    assert len(modes) >= 8
    bad = {path: oct(mode) for path, (mode, _, _, _) in modes.items()
           if mode & 0o007 or (mode & 0o020 and path not in group_writable)
           or mode & 0o6000}
    assert bad == {}
    foreign = {path for path, (_, uid, _, _) in modes.items() if uid != user.pw_uid}
    assert foreign == set()


# -- the milter ------------------------------------------------------------------


def test_the_milter_drops_to_the_user_with_its_socket_closed(observed, accounts):  # noqa: F811
    daemon, user = observed["daemon"], accounts["daemon"]
    top = Path(tempfile.mkdtemp(prefix="amlpm", dir="/tmp"))
    top.chmod(0o755)
    sock = top / "milter.sock"
    try:
        with MilterInstance(top, daemon, f"unix:{sock}", "--socket-group", GROUP,
                            user=DAEMON_USER) as milter:
            seen = identity(milter.proc.pid)
            info = os.stat(sock)
        assert seen["uid"] == {str(user.pw_uid)} and seen["caps"] == {"0000000000000000"}, seen
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (
            0o660, user.pw_uid, user.pw_gid)
    finally:
        shutil.rmtree(top, ignore_errors=True)


# -- external tools: no network --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InheritLimits(Limits):
    tool_network: str = "inherit"


CALL_OUT = """
import socket, sys
out = []
for family, address in ((socket.AF_INET, ("127.0.0.1", int(sys.argv[1]))),
                        (socket.AF_UNIX, "\\0" + sys.argv[2])):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(address)
        s.sendall(b"hello from the tool")
        out.append("connected")
    except OSError as err:
        out.append(type(err).__name__)
print(" ".join(out))
"""


def run_fake_tool(base: str, port: int, abstract: str, inherit: bool) -> str:
    """As the daemon's user: FAKE_TOOL through run_tool, trying the listeners."""
    ctx = Context(InheritLimits() if inherit else Limits(), 1000, base)
    work = ctx.workdir()
    result = external.run_tool(ctx, [FAKE_TOOL, "-I", "-c", CALL_OUT, str(port), abstract],
                               cwd=work)
    shutil.rmtree(work, ignore_errors=True)
    return result.text.strip()


def accepted(listener: socket.socket) -> int:
    count = 0
    listener.settimeout(0.2)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return count
        conn.close()
        count += 1


@pytest.fixture
def listeners():
    tcp = socket.create_server(("127.0.0.1", 0))
    name = f"amavisd-test-{os.getpid()}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\0" + name)
    unix.listen(8)
    yield tcp, unix, tcp.getsockname()[1], name
    tcp.close()
    unix.close()


def test_an_external_tool_cannot_reach_the_network(listeners, accounts, short_tmp):  # noqa: F811
    tcp, unix, port, name = listeners
    base = short_tmp / "base"
    base.mkdir()
    os.chown(base, accounts["daemon"].pw_uid, accounts["daemon"].pw_gid)
    isolated = as_user(accounts["daemon"], run_fake_tool, str(base), port, name, False)
    print("isolated tool:", isolated)
    assert isolated.split() == ["OSError", "ConnectionRefusedError"]
    assert (accepted(tcp), accepted(unix)) == (0, 0), isolated
    # the control: the same tool, tool_network = "inherit", gets through to both
    inherited = as_user(accounts["daemon"], run_fake_tool, str(base), port, name, True)
    assert inherited == "connected connected"
    assert (accepted(tcp), accepted(unix)) == (1, 1)


def test_where_namespaces_are_refused_tools_still_run_and_it_is_said_once(
        listeners, accounts, short_tmp, caplog):  # noqa: F811
    """The kernel refuses a user namespace inside a chroot: a real refusal.
    The probe says why, a warning is logged once, and a tool still runs
    (with the host's network: defence in depth, not a reason to tempfail)."""
    jail = short_tmp / "jail"
    jail.mkdir()

    def probe_in_chroot() -> list:
        os.chroot(str(jail))
        external._isolation.clear()
        with caplog.at_level("WARNING", logger="amavisd"):
            first, second = external.isolation_failure(), external.isolation_failure()
        return [first, second, [r.getMessage() for r in caplog.records]]

    root = pwd.getpwuid(0)
    first, second, records = as_user(root, probe_in_chroot)
    assert first == second == os.strerror(1)  # EPERM
    assert len([r for r in records if "cannot be cut off from the network" in r]) == 1
    # and run_tool goes on without the namespace when the probe said no
    tcp, _, port, name = listeners
    saved = dict(external._isolation)
    external._isolation["failure"] = "refused (set by the test)"
    try:
        base = short_tmp / "base"
        base.mkdir()
        assert run_fake_tool(str(base), port, name, False).startswith("connected")
    finally:
        external._isolation.clear()
        external._isolation.update(saved)
    assert accepted(tcp) == 1


def test_isolation_costs_little(short_tmp):
    """The figure for the report: a no-op tool with and without the namespace."""
    base = short_tmp / "b"
    base.mkdir()
    timings = {}
    for mode, limits_ in (("isolated", Limits()), ("inherit", InheritLimits())):
        ctx = Context(limits_, 1000, str(base))
        work = ctx.workdir()
        external.run_tool(ctx, ["/bin/true"], cwd=work)  # warm
        started = time.monotonic()
        for _ in range(20):
            external.run_tool(ctx, ["/bin/true"], cwd=work)
        timings[mode] = (time.monotonic() - started) / 20
    print(f"run_tool(/bin/true): isolated {timings['isolated'] * 1000:.1f} ms, "
          f"inherit {timings['inherit'] * 1000:.1f} ms")
    assert timings["isolated"] < timings["inherit"] + 0.05


# -- the systemd units ---------------------------------------------------------------

UNITS = {"amavisd": 3.0, "amavisd-milter": 3.0}  # exposure at most (systemd says <= 4.9 "OK")
HARDENING = ("ProtectSystem=strict", "ReadWritePaths=-", "PrivateTmp=yes", "NoNewPrivileges=yes",
             "CapabilityBoundingSet=CAP_", "SystemCallFilter=@system-service",
             "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "PrivateMounts=yes")


def analyze(*args: str) -> subprocess.CompletedProcess:
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze (Debian package systemd)")
    done = subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=120)
    if "--offline" in args and "offline" in done.stderr and done.returncode:
        pytest.skip(f"this systemd-analyze has no --offline: {done.stderr.strip()}")
    return done


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_unit_is_sandboxed_and_systemd_scores_it(name):
    unit = Path(ROOT) / "init" / f"{name}.service"
    lines = unit.read_text().splitlines()
    missing = [d for d in HARDENING if not any(line.startswith(d) for line in lines)]
    assert missing == []
    done = analyze("security", "--offline=yes", "--no-pager", str(unit))
    match = re.search(rf"Overall exposure level for {re.escape(name)}\.service: ([\d.]+)",
                      done.stdout)
    assert match, done.stdout[-2000:] + done.stderr
    print(f"{name}.service exposure {match.group(1)}")
    assert float(match.group(1)) <= UNITS[name]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_unit_verifies_cleanly(name, short_tmp):
    """`systemd-analyze verify`, with the commands pointed at an executable
    that exists here (it checks them): no unknown key, no bad value."""
    text = (Path(ROOT) / "init" / f"{name}.service").read_text()
    copy = short_tmp / f"{name}.service"
    copy.write_text(re.sub(r"/usr/local/bin/amavisd(-milter)?\b", "/bin/true", text))
    done = analyze("verify", "--no-pager", str(copy))
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# -- dropping root, proved -------------------------------------------------------------


def drop_in_child(keep_caps: bool) -> str:
    """Fork; in the child (still root) drop to the daemon's user; say how it went."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if keep_caps:  # what a careless library could have set: PR_SET_KEEPCAPS
                ctypes.CDLL(None, use_errno=True).prctl(8, 1, 0, 0, 0)
            try:
                privileges.drop(DAEMON_USER, GROUP)
                said = f"dropped {os.getresuid()} caps {privileges.capabilities():#x}"
            except privileges.PrivilegeError as err:
                said = f"refused: {err}"
            os.write(write_end, said.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        said = fh.read().decode()
    os.waitpid(pid, 0)
    return said


def test_dropping_root_leaves_no_way_back(accounts):  # noqa: F811
    uid = accounts["daemon"].pw_uid
    assert drop_in_child(keep_caps=False) == f"dropped {(uid, uid, uid)} caps 0x0"
    # permitted capabilities kept across setuid(): the start must stop
    assert drop_in_child(keep_caps=True).startswith("refused: capabilities left")


def test_the_setting_reaches_the_tools():
    assert Limits.from_config(configuration.defaults()).tool_network == "isolated"
    inherit = configuration.defaults() | {"tool_network": "inherit"}
    assert Limits.from_config(inherit).tool_network == "inherit"


def test_the_milter_needs_no_capability_when_started_as_its_user(accounts, short_tmp):  # noqa: F811
    """The alternative the milter's unit describes: User=amavis,
    SupplementaryGroups=<the MTA's group>, CapabilityBoundingSet= (empty).
    Started so (setpriv: the user, one supplementary group, no capability at
    all, no_new_privs), it binds and gives its socket to that group."""
    if not shutil.which("setpriv") or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs setpriv (util-linux) and the system python3")
    user = accounts["daemon"]
    mta_gid = ensure_group("amavisd-test-mta")
    run = short_tmp / "run"
    run.mkdir()
    os.chown(run, user.pw_uid, user.pw_gid)
    sock = run / "milter.sock"
    launcher = f"import sys; sys.path.insert(0, {ROOT!r}); from amavisd_client.milter.main " \
               "import main; sys.exit(main())"
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", f"--groups={mta_gid}",
         "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
         "/usr/bin/python3", "-I", "-S", "-c", launcher, "-c", os.devnull, "--foreground",
         "--log", "stderr", "--listen", f"unix:{sock}", "--socket-group", "amavisd-test-mta",
         "--user", DAEMON_USER, "--daemon-socket", str(short_tmp / "d.sock"),
         "--tempbase", str(run)], cwd="/", stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while proc.poll() is None and not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        seen = identity(proc.pid)
        info = os.stat(sock)
        assert seen["uid"] == {str(user.pw_uid)} and seen["caps"] == {"0000000000000000"}
        assert status(proc.pid)["CapBnd"] == "0000000000000000"
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (
            0o660, user.pw_uid, mta_gid)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=30)
