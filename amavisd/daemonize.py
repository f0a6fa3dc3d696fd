"""Start-up chores of `amavisd run`: directories, and detaching with python-daemon.

The work dir and temp base are created (and given to the daemon's user)
while we may still be root; the temp base is group-writable so clients in
the daemon's group can spool messages there, and closed to others.
"""

from __future__ import annotations

import os
import socket

from amavisd.config import Config
from amavisd.privileges import chown_to

WORKDIR_MODE = 0o750
TEMPBASE_MODE = 0o770
QUARANTINE_MODE = 0o700  # infected mail: for the daemon's user only


def prepare_dirs(config: Config) -> None:
    """Create the daemon's dirs while still root, owned by the user it becomes."""
    dirs = [(config.workdir, WORKDIR_MODE), (config.tempbase_path, TEMPBASE_MODE)]
    if config.quarantine_dir:
        dirs.append((config.quarantine_dir, QUARANTINE_MODE))
    for path, mode in dirs:
        if not os.path.isdir(path):
            os.makedirs(path, mode=mode, exist_ok=True)
            os.chmod(path, mode)
            chown_to(path, config.user, config.group)


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
