"""The client's spool: one private dir under the daemon's temp base holding
email.txt, for the daemon to read by path.

The temp base is shared with every member of the daemon's group, and AM.PDP
can only name a path. So the dir (0750) and the file (0640), both given the
temp base's group, are made through a descriptor of the dir, and both
descriptors stay open until the end: what the client delivers is read back
from the file it wrote (`read()`), never through the path, which a group
member could swap by renaming our dir (on a temp base without the sticky
bit). A temp base that others may write without the sticky bit is refused
outright: there a swap and a swap back between the daemon's read and our
check cannot be seen. `verify()` checks that the path still leads to the dir
and the file we made, before the request and after the verdict; a mismatch
is a tempfail. Removal goes through the dir's descriptor too, so a swap
cannot make us delete someone else's files.

Like the rest of the client, stdlib modules Python has loaded anyway, nothing more.
"""

from __future__ import annotations

import os

DIR_MODE = 0o750
FILE_MODE = 0o640
MAIL_FILE = "email.txt"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def inside(path: str, base: str) -> bool:
    """True if `path` is in a subdirectory of the temp base `base` (the layout
    the daemon accepts), so the file can be named as it is, without a spool."""
    real, base = os.path.realpath(path), os.path.realpath(base)
    parent = os.path.dirname(real)
    return parent != base and parent.startswith(base + os.sep)


class SpoolError(Exception):
    """The spool could not be made, or was tampered with: always a tempfail."""


class Spool:
    dir_mode, file_mode = DIR_MODE, FILE_MODE  # from their making on: never wider first

    def __init__(self, tempbase: str):
        self.tempbase = tempbase
        self.name = "client-" + os.urandom(8).hex()
        self.dir = os.path.join(tempbase, self.name)
        self.path = os.path.join(self.dir, MAIL_FILE)
        self.dir_fd = self.fd = -1
        self.dir_id: tuple[int, int] | None = None  # set once the dir is known to be ours
        self.file_id = (0, 0)
        self.size = 0
        try:
            base = os.stat(tempbase)
        except OSError as err:
            raise SpoolError(f"temp base {tempbase}: {err.strerror}") from None
        if base.st_mode & 0o022 and not base.st_mode & 0o1000:
            # Without the sticky bit a group member can rename our dir away and
            # back (a swap the daemon scans, and verify() cannot see afterwards).
            raise SpoolError(f"temp base {tempbase} is writable by others and not sticky "
                             "(chmod +t it)")
        try:
            os.mkdir(self.dir, self.dir_mode)
        except OSError as err:
            raise SpoolError(f"cannot create a spool dir in {tempbase}: {err.strerror}") \
                from None
        try:
            self.dir_fd = os.open(self.dir, _DIR_FLAGS)
            info = os.fstat(self.dir_fd)
            if info.st_uid != os.geteuid():
                raise SpoolError(f"spool dir {self.dir} was replaced as it was made")
            self.dir_id = (info.st_dev, info.st_ino)
            os.fchmod(self.dir_fd, self.dir_mode)  # exactly, whatever the umask
            self.fd = os.open(MAIL_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, self.file_mode, dir_fd=self.dir_fd)
            os.fchmod(self.fd, self.file_mode)  # the daemon may be another user of the group
            share_group(self.dir_fd, base.st_gid)
            share_group(self.fd, base.st_gid)
            info = os.fstat(self.fd)
            self.file_id = (info.st_dev, info.st_ino)
        except OSError as err:
            self.remove()
            raise SpoolError(f"cannot create {self.path}: {err.strerror}") from None
        except SpoolError:
            self.remove()
            raise

    def write_from(self, fd_in: int) -> None:
        while True:
            chunk = os.read(fd_in, 1 << 20)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.fd, view):]
            self.size += len(chunk)

    def verify(self) -> None:
        """Raise SpoolError unless the path still names the dir and file we made,
        and the file still holds what we wrote."""
        try:
            here = os.stat(self.dir, follow_symlinks=False)
            mail = os.stat(MAIL_FILE, dir_fd=self.dir_fd, follow_symlinks=False)
            ours = os.fstat(self.fd)
        except OSError as err:
            raise SpoolError(f"spool {self.path} is gone: {err.strerror}") from None
        if (here.st_dev, here.st_ino) != self.dir_id:
            raise SpoolError(f"spool dir {self.dir} was replaced")
        if (mail.st_dev, mail.st_ino) != self.file_id:
            raise SpoolError(f"spool file {self.path} was replaced")
        if ours.st_size != self.size:
            raise SpoolError(f"spool file {self.path} changed size")

    def read(self) -> bytes:
        """The spooled message, from our descriptor (never through the path)."""
        chunks = []
        offset = 0
        while offset < self.size:
            chunk = os.pread(self.fd, min(1 << 20, self.size - offset), offset)
            if not chunk:
                raise SpoolError(f"spool file {self.path} was truncated")
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def remove(self) -> None:
        """Empty our dir through its descriptor (with tempdir_removed_by=client
        the server may have left work files in it: amavisd-new does), then
        remove it if its name in the temp base still leads to it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd < 0:
            return
        if self.dir_id is None:  # not ours: leave it alone
            os.close(self.dir_fd)
            self.dir_fd = -1
            return
        try:
            empty_dir(self.dir_fd)
            base_fd = os.open(self.tempbase, _DIR_FLAGS)
        except OSError:
            base_fd = -1
        try:
            if base_fd >= 0:
                here = os.stat(self.name, dir_fd=base_fd, follow_symlinks=False)
                if (here.st_dev, here.st_ino) == self.dir_id:
                    os.rmdir(self.name, dir_fd=base_fd)
        except OSError:
            pass
        finally:
            if base_fd >= 0:
                os.close(base_fd)
            os.close(self.dir_fd)
            self.dir_fd = -1


def share_group(fd: int, gid: int) -> None:
    """Give our spool the temp base's group, the daemon's: a client run as
    root (Sendmail's local mailer, to call mail.local) or with another
    primary group (U=root:mail) would leave the daemon a dir it cannot read.
    Where we may not (not a member), the daemon is our own user."""
    if os.fstat(fd).st_gid != gid:
        try:
            os.fchown(fd, -1, gid)
        except PermissionError:
            pass


def empty_dir(dir_fd: int) -> None:
    """rm -r of a directory's content through its descriptor, following no
    symlink (and without importing shutil)."""
    for entry in list(os.scandir(dir_fd)):
        try:
            if entry.is_dir(follow_symlinks=False):
                sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    empty_dir(sub)
                finally:
                    os.close(sub)
                os.rmdir(entry.name, dir_fd=dir_fd)
            else:
                os.unlink(entry.name, dir_fd=dir_fd)
        except OSError:
            pass
