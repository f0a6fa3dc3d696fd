"""Dropping root: after the sockets are bound, before any message is read.

For good: groups, gid, then uid (real, effective and saved, which
setuid() as root sets together), and then proved: setuid(0) must fail and
no capability may be left, or the start stops. A daemon that could become
root again would give a decoder bug the whole machine.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd

log = logging.getLogger("amavisd")


class PrivilegeError(Exception):
    pass


def resolve(user: str, group: str) -> tuple[int, int, str]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"user: no such user {user!r}") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"group: no such group {group!r}") from None
    return pw.pw_uid, gid, pw.pw_name


def drop(user: str, group: str) -> None:
    """Become `user`:`group` for good; without a user, warn when staying root."""
    if not user:
        if os.geteuid() == 0:
            log.warning("running as root: set user/group (e.g. amavis) in the config")
        return
    uid, gid, name = resolve(user, group)
    if os.geteuid() != 0:
        if os.geteuid() != uid:
            raise PrivilegeError(f"user: cannot become {user!r} without being root")
        return
    os.setgroups([])
    os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)
    if 0 in os.getresuid() or 0 in os.getresgid() or _can_regain_root():
        raise PrivilegeError("still root after dropping privileges")
    leftover = capabilities()
    if leftover:
        raise PrivilegeError(f"capabilities left after dropping privileges: {leftover:#x}")
    log.info("dropped privileges to %s (uid %d, gid %d)", name, uid, gid)


def _can_regain_root() -> bool:
    try:
        os.setuid(0)
    except PermissionError:
        return False
    return True


def capabilities(pid: str = "self") -> int:
    """The capabilities PID has or may take up again (CapPrm, CapEff, CapAmb
    of /proc/PID/status, or-ed; 0 where /proc is not there). Permitted counts:
    with PR_SET_KEEPCAPS a setuid() leaves them, to be made effective later."""
    found = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("CapPrm:", "CapEff:", "CapAmb:")):
                    found |= int(line.split()[1], 16)
    except OSError:
        pass
    return found


def chown_to(path: str, user: str, group: str) -> None:
    """Give a directory we created as root to the daemon's user."""
    if user and os.geteuid() == 0:
        uid, gid, _ = resolve(user, group)
        os.chown(path, uid, gid)
