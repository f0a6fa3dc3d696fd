"""A quarantine store that fails part-way leaves nothing behind (issue 17).

Each point where a file-store entry can fail, with a real fault: the
message write (RLIMIT_FSIZE: EFBIG; a full 1 MiB tmpfs: ENOSPC), the sidecar
write (the same two), the sidecar's creation (the quarantine made 000 under
a store that dropped root: EACCES), the rename that completes the entry
(chattr +a on the directory: EPERM, even for root). The mail is tempfailed
for the error that broke the store, never for one of its clean-up, and no
message file is left without its sidecar; where the clean-up itself is
refused, the next store removes what was left.

A fault meant to land mid-store is timed by the message itself: the store
reads it from a FIFO (a path, as for a big message), which it opens once
its message file is made and locked; the test does its harm then, and
writes the message. Stores under a file size limit or another user run in
a forked child. No fakes.
"""

from __future__ import annotations

import errno
import os
import pickle
import pwd
import random
import resource
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.envelope import Envelope
from amavisd.pipeline import Pipeline
from amavisd.quarantine.file import FileStore
from amavisd.quarantine.release import release
from amavisd.verdict import Category, Destiny, Finding, Result
from tests.integration.test_quarantine_store import MESSAGE, process
from tests.rigs.ledger import message_ids, quarantined_ids
from tests.rigs.mailboxes import ensure_user
from tests.rigs.mta_cases import DAEMON_USER

pytestmark = pytest.mark.integration

RESULT = Result(log_id="q-1", category=Category.INFECTED, destiny=Destiny.DISCARD,
                findings=[Finding("p001", "Eicar-Test-Signature", "clamd")])
ENVELOPE = Envelope(sender="<alice@example.test>", recipients=["<bob@example.test>"])
# a sidecar of ~13 KiB next to a message of 1 KiB
CROWD = Envelope(sender="<alice@example.test>",
                 recipients=[f"<recipient-{n:03d}@a-long-domain.example.test>"
                             for n in range(300)])
SMALL = b"Subject: small\r\n\r\n" + b"x" * 1000 + b"\r\n"


def message(size: int) -> bytes:
    """Incompressible, so a gzip store writes as much as a plain one."""
    return b"Subject: big\r\n\r\n" + random.Random(size).randbytes(size)


def entry_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n != "filler")


def store_via_fifo(store: FileStore, data: bytes, *, harm: Callable[[], None] | None = None,
                   envelope: Envelope = ENVELOPE, child: bool = False,
                   user: pwd.struct_passwd | None = None, fsize: int = 0) -> object:
    """Store `data`, read from a FIFO; `harm()` runs once the store has made
    and locked its message file and waits for the message. In a forked child
    (as `user`, under RLIMIT_FSIZE `fsize`) when `child`. The id, or the error."""
    fifo = Path(store.directory).parent / f"fifo-{os.getpid()}-{threading.get_ident()}"
    os.mkfifo(fifo, 0o666)
    os.chmod(fifo, 0o666)
    outcome: list[object] = []
    try:
        if child:
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: store, say how it went, leave
                try:
                    os.close(read_end)
                    if fsize:
                        resource.setrlimit(resource.RLIMIT_FSIZE,
                                           (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
                    if user is not None:
                        os.setgroups([])
                        os.setgid(user.pw_gid)
                        os.setuid(user.pw_uid)
                    try:
                        said: object = store.store(str(fifo), envelope, RESULT)
                    except Exception as err:  # noqa: BLE001 - the outcome under test
                        said = err
                    with os.fdopen(write_end, "wb") as out:
                        out.write(pickle.dumps(said))
                finally:
                    os._exit(0)
            os.close(write_end)
        else:
            def run() -> None:
                try:
                    outcome.append(store.store(str(fifo), envelope, RESULT))
                except Exception as err:  # noqa: BLE001 - the outcome under test
                    outcome.append(err)
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
        try:
            with open(fifo, "wb", buffering=0) as pipe:  # once the store opened it: its file made
                if harm is not None:
                    harm()
                view = memoryview(data)
                while view:
                    view = view[pipe.write(view):]
        except BrokenPipeError:
            pass  # the store failed before it read the whole message
        if child:
            with os.fdopen(read_end, "rb") as said_back:
                outcome.append(pickle.loads(said_back.read()))
            os.waitpid(pid, 0)
        else:
            thread.join(30)
        return outcome[0]
    finally:
        fifo.unlink()


@pytest.fixture
def append_only():
    """chattr +a / -a on a directory: files may be made there, none renamed
    nor removed, even by root. Always undone."""
    marked: list[Path] = []

    def mark(directory: Path, on: bool = True) -> None:
        done = subprocess.run(["chattr", "+a" if on else "-a", str(directory)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"no append-only directories here: {done.stderr.strip()}")
        (marked.append if on else marked.remove)(directory)

    yield mark
    for directory in marked:
        subprocess.run(["chattr", "-a", str(directory)], check=False)


def fill(directory: str, leave: int = 0) -> Path:
    """Fill the file system of `directory`, then give `leave` bytes back."""
    path = Path(directory) / "filler"
    with open(path, "wb", buffering=0) as out:
        try:
            while out.write(b"\0" * 4096):
                pass
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
        if leave:
            os.ftruncate(out.fileno(), max(0, out.tell() - leave))
    return path


# -- the message write --------------------------------------------------------------------


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_a_file_size_limit_on_the_message_leaves_nothing(tmp_path: Path, gzip: bool):
    store = FileStore(str(tmp_path / "q"), gzip=gzip)
    err = store_via_fifo(store, message(256 * 1024), child=True, fsize=64 * 1024)
    assert isinstance(err, OSError) and err.errno == errno.EFBIG, err
    assert entry_files(tmp_path / "q") == []


def test_a_full_disk_under_the_message_leaves_nothing(small_tmpfs: str):
    store = FileStore(f"{small_tmpfs}/q")
    store.prepare()
    filler = fill(small_tmpfs)
    err = store_via_fifo(store, message(64 * 1024))
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC, err
    assert entry_files(Path(store.directory)) == []
    filler.unlink()
    qid = store.store(SMALL, ENVELOPE, RESULT)
    assert entry_files(Path(store.directory)) == [f"virus-{qid}", f"virus-{qid}.json"]


# -- the sidecar write ---------------------------------------------------------------------


def test_a_file_size_limit_on_the_sidecar_leaves_nothing(tmp_path: Path):
    store = FileStore(str(tmp_path / "q"))
    err = store_via_fifo(store, SMALL, envelope=CROWD, child=True, fsize=4096)
    assert isinstance(err, OSError) and err.errno == errno.EFBIG, err
    assert err.filename is None or ".json" in err.filename  # the sidecar's write, not the message's
    assert entry_files(tmp_path / "q") == []


def test_a_full_disk_under_the_sidecar_leaves_nothing(small_tmpfs: str):
    store = FileStore(f"{small_tmpfs}/q")
    store.prepare()
    fill(small_tmpfs, leave=4096)  # one page: the message's, none for its sidecar
    err = store_via_fifo(store, SMALL, envelope=CROWD)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC, err
    assert entry_files(Path(store.directory)) == []


def test_a_quarantine_made_000_mid_store_leaves_nothing(short_tmp: Path):
    """The daemon's user owns its quarantine; made 000 while a message is
    being written, the sidecar cannot be made (EACCES, the error the mail is
    tempfailed for), and the message file is removed once the directory is
    0700 again, as the next store would make it anyway."""
    user = ensure_user(DAEMON_USER, DAEMON_USER)
    quarantine = short_tmp / "q"
    quarantine.mkdir(0o700)
    os.chown(quarantine, user.pw_uid, user.pw_gid)
    store = FileStore(str(quarantine))
    err = store_via_fifo(store, SMALL, child=True, user=user, harm=lambda: quarantine.chmod(0))
    assert isinstance(err, PermissionError), err
    assert err.filename.endswith(".json.part"), err.filename  # the sidecar's, not a clean-up's
    assert entry_files(quarantine) == []
    assert quarantine.stat().st_mode & 0o777 == 0o700


# -- the rename that completes an entry ------------------------------------------------------


def test_a_rename_refused_is_the_error_and_the_next_store_clears_what_was_left(
        tmp_path: Path, append_only):
    """Append-only: the sidecar is made, its rename refused (EPERM), and so is
    every removal. The rename's error is raised; once the directory is
    writable again the next store removes the message and its half sidecar."""
    quarantine = tmp_path / "q"
    store = FileStore(str(quarantine))
    store.prepare()
    err = store_via_fifo(store, SMALL, harm=lambda: append_only(quarantine))
    assert isinstance(err, PermissionError), err
    assert err.filename.endswith(".json.part") and err.filename2.endswith(".json"), err
    left = entry_files(quarantine)
    assert len(left) == 2 and left[1].endswith(".json.part"), left
    assert any("until the next store" in note for note in err.__notes__)
    assert store.list() == []  # never listed, so never released
    append_only(quarantine, on=False)
    qid = store.store(SMALL, ENVELOPE, RESULT)
    assert entry_files(quarantine) == [f"virus-{qid}", f"virus-{qid}.json"]


def test_a_clean_up_refused_does_not_hide_why_the_store_failed(tmp_path: Path, append_only):
    """The message write fails (EFBIG) in an append-only directory: the
    removal is refused (EPERM), yet EFBIG is what the store raises. The
    message file left is not locked by anyone: the kill sweep takes it."""
    quarantine = tmp_path / "q"
    store = FileStore(str(quarantine))
    store.prepare()
    err = store_via_fifo(store, message(256 * 1024), child=True, fsize=64 * 1024,
                         harm=lambda: append_only(quarantine))
    assert isinstance(err, OSError) and err.errno == errno.EFBIG, err
    [left] = entry_files(quarantine)
    assert any(left in note for note in err.__notes__), err.__notes__
    append_only(quarantine, on=False)
    assert store.sweep_incomplete() == [left] and entry_files(quarantine) == []


def test_the_clean_up_removes_in_the_directory_the_store_began_in(small_tmpfs: str):
    """The quarantine's path is swapped mid-store for a directory holding a
    file of the very name the store made; the store fails (ENOSPC). What it
    made is removed where it made it, and the other file is left alone."""
    quarantine = Path(small_tmpfs) / "q"
    store = FileStore(str(quarantine))
    store.prepare()
    moved = Path(small_tmpfs) / "q.moved"

    def swap() -> None:
        [name] = os.listdir(quarantine)
        quarantine.rename(moved)
        quarantine.mkdir(0o700)
        (quarantine / name).write_bytes(b"not the store's")
        fill(small_tmpfs)

    err = store_via_fifo(store, message(64 * 1024), harm=swap)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC, err
    assert entry_files(moved) == []
    [other] = os.listdir(quarantine)
    assert (quarantine / other).read_bytes() == b"not the store's"


def test_the_mail_is_tempfailed_for_what_broke_the_store(clamd_nodecomp, small_tmpfs: str,
                                                          append_only, tmp_path: Path):
    """Through the pipeline: the disk is full (ENOSPC) and the quarantine
    append-only, so the message file cannot be removed (EPERM) either. The
    mail is tempfailed for the full disk; once both are fixed it is kept,
    and the file the failed store left is gone."""
    quarantine = Path(small_tmpfs) / "q"
    pipeline = Pipeline(configuration.load(None, {
        "clamd": clamd_nodecomp.address, "backup_scanners": [],
        "quarantine_dir": str(quarantine), "notify_method": "smtp:127.0.0.1:9"}))
    FileStore(str(quarantine)).prepare()
    append_only(quarantine)
    filler = fill(small_tmpfs)
    result = process(pipeline, tmp_path)
    assert result.destiny is Destiny.TEMPFAIL
    assert result.tempfail_reason == f"quarantine {quarantine}: No space left on device"
    assert len(entry_files(quarantine)) == 1  # the message file, not removable yet
    append_only(quarantine, on=False)
    filler.unlink()
    result = process(pipeline, tmp_path)
    assert result.verdict == "INFECTED" and result.destiny is Destiny.DISCARD
    qid = result.quarantine_id
    assert entry_files(quarantine) == [qid, f"{qid}.json"]
    assert (quarantine / qid).read_bytes() == MESSAGE


# -- what counts as kept -------------------------------------------------------------------


def test_the_ledger_counts_as_kept_what_a_release_can_send(tmp_path: Path, sink):
    """tests/rigs/ledger.py says a message was kept when a release could
    re-send it: complete entries, plain or gzipped. A message file without its
    sidecar (or with half a sidecar), a damaged sidecar, a sidecar without
    its message and a message changed since it was kept are not."""
    quarantine = tmp_path / "q"
    plain, gzipped = FileStore(str(quarantine)), FileStore(str(quarantine), gzip=True)
    harm: dict[str, Callable[[Path, Path], object]] = {
        "complete": lambda data, side: None,
        "gzipped": lambda data, side: None,
        "no-sidecar": lambda data, side: side.unlink(),
        "half-sidecar": lambda data, side: side.rename(f"{side}.part"),
        "damaged-sidecar": lambda data, side: side.write_text("{not json"),
        "no-message": lambda data, side: data.unlink(),
        "changed": lambda data, side: data.write_bytes(data.read_bytes() + b"changed\r\n"),
    }
    ids = {}
    for mid, damage in harm.items():
        store = gzipped if mid == "gzipped" else plain
        qid = store.store(f"Message-ID: <{mid}@agree.test>\r\n\r\nkept\r\n".encode(),
                          ENVELOPE, RESULT)
        entry = store.get(qid)
        damage(quarantine / entry.file, quarantine / f"virus-{qid}.json")
        ids[mid] = qid
    host, port = sink.address
    settings = configuration.load(None, {"quarantine_dir": str(quarantine),
                                         "release_method": f"smtp:[{host}]:{port}"})
    released = {mid for mid, qid in ids.items()
                if release(settings, qid, [], "agree", local=True).ok}
    assert released == {"complete", "gzipped"}
    assert sorted(m for got in sink.messages for m in message_ids(got.data)) == [
        "complete@agree.test", "gzipped@agree.test"]
    assert sorted(quarantined_ids(quarantine)) == ["complete@agree.test", "gzipped@agree.test"]
