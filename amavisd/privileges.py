"""Dropping root: after the sockets are bound, before any message is read."""

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
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PrivilegeError("still root after dropping privileges")
    log.info("dropped privileges to %s (uid %d, gid %d)", name, uid, gid)


def chown_to(path: str, user: str, group: str) -> None:
    """Give a directory we created as root to the daemon's user."""
    if user and os.geteuid() == 0:
        uid, gid, _ = resolve(user, group)
        os.chown(path, uid, gid)
