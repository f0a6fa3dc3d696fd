"""An interpreter that only root can read, for tests of the privilege drop.

A site may install amavisd in a venv (or use a Python build) that is root's
alone: the daemon starts as root and runs, but once it is `amavis` no file of
the standard library or of site-packages can be opened, and any import after
the drop fails. `seal(dest)` reproduces that on any machine: `dest` (mode
0700, root's) gets this interpreter laid out as a prefix of its own,

    dest/bin/python3.X                     the binary (its libpython is
                                           mapped at exec, while still root)
    dest/lib/python3.X/                    the standard library, lib-dynload
    dest/lib/python3.X/site-packages/      this venv's packages, so amavisd's
                                           editable install points back here

made of hard links (copies across filesystems), so it costs well under a
second. Run it with `-I` (no PYTHONPATH, no current dir on sys.path) so that
nothing readable by `amavis` stands in for what the seal hides.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import sysconfig
from pathlib import Path

# Parts of the standard library a mail filter never loads (and the biggest).
SKIPPED = {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3"}


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)
    return dst


def _tree(src: str, dst: Path, skipped: set[str] = frozenset()) -> None:
    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy,
                    ignore=lambda _dir, names: [n for n in names if n in skipped
                                                or n.startswith("config-")])  # libpython.a


def seal(dest: Path) -> Path:
    """Build the sealed interpreter under `dest` (created 0700); its binary."""
    if os.geteuid() != 0:
        raise PermissionError("sealing an interpreter from other users needs root")
    dest = Path(dest)
    dest.mkdir(mode=0o700, parents=True)
    os.chmod(dest, 0o700)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    paths = sysconfig.get_paths()
    lib = dest / "lib" / version
    _tree(paths["stdlib"], lib, SKIPPED)
    if not (lib / "lib-dynload").is_dir():  # a distribution's layout may split them
        _tree(os.path.join(paths["platstdlib"], "lib-dynload"), lib / "lib-dynload")
    _tree(paths["purelib"], lib / "site-packages")
    if paths["platlib"] != paths["purelib"]:
        shutil.copytree(paths["platlib"], lib / "site-packages", symlinks=True,
                        copy_function=_link_or_copy, dirs_exist_ok=True)
    (dest / "bin").mkdir()
    binary = dest / "bin" / version
    _link_or_copy(os.path.realpath(sys.executable), str(binary))
    return binary
