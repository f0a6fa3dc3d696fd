"""Start-up chores of `amavisd run`: directories, and detaching with python-daemon.

The work dir, temp base and work base are created (and given to the
daemon's user) while we may still be root. The temp base is group-writable
so clients in the daemon's group can spool messages there, closed to others,
and sticky, so no client can rename or remove another's spool. The work base
holds the daemon's own per-message dirs and is the daemon user's alone:
a client must never be able to name, swap or remove anything in it.
"""

from __future__ import annotations

import os
import socket
import stat

from amavisd.config import Config
from amavisd.privileges import chown_to, resolve
from amavisd.quarantine import open_store
from amavisd.quarantine.file import FileStore

WORKDIR_MODE = 0o750
TEMPBASE_MODE = 0o1770
WORK_BASE_MODE = 0o700
QUARANTINE_MODE = 0o700  # infected mail: for the daemon's user only


def prepare_dirs(config: Config) -> None:
    """Create the daemon's dirs while still root, owned by the user it becomes;
    an existing temp base or work base of that user gets its safe mode."""
    dirs = [(config.workdir, WORKDIR_MODE), (config.tempbase_path, TEMPBASE_MODE),
            (config.work_base_path, WORK_BASE_MODE)]
    store = open_store(config)
    if isinstance(store, FileStore):  # the dir the store names, not quarantine_dir alone
        dirs.append((store.directory, QUARANTINE_MODE))
    for path, mode in dirs:
        if not os.path.isdir(path):
            os.makedirs(path, mode=mode, exist_ok=True)
            os.chmod(path, mode)
            chown_to(path, config.user, config.group)
    tighten(config.tempbase_path, config, lambda m: (m | stat.S_ISVTX) & ~0o002)
    tighten(config.work_base_path, config, lambda m: m & ~0o077)


def tighten(path: str, config: Config, safe_mode) -> None:
    """Give an existing dir of the daemon's user the mode `safe_mode(mode)`
    (a dir made by an older version: no sticky bit on the temp base); a dir
    someone else owns is the admin's choice, and the workers check it."""
    owner = resolve(config.user, config.group)[0] if config.user else os.geteuid()
    try:
        st = os.stat(path)
    except OSError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == owner and safe_mode(mode) != mode:
        os.chmod(path, safe_mode(mode))


def detach(config: Config, listeners: list[socket.socket]) -> None:
    """Become a background daemon, keeping the bound sockets and log handlers."""
    import daemon  # python-daemon: only needed on this path

    from amavisd import logs

    context = daemon.DaemonContext(
        detach_process=True,
        working_directory="/",
        umask=0o027,
        files_preserve=[s.fileno() for s in listeners] + logs.preserved_fds(),
        signal_map={},  # the master installs its own handlers
        prevent_core=True,
    )
    context.open()
