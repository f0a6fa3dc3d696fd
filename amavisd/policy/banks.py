"""Policy banks: named sets of settings laid over the config for one message.

amavisd-new's model, kept: a bank (`[policy_banks.NAME]`) overrides any
[policy], [notify] or [headers] setting (checked at load by the setting's
own row), and several banks apply in order, the later winning key by key.
They are chosen, in the order amavisd-new loads them (as the information
becomes available, Amavis::In::AMPDP::check_ampdp_policy):

1. by the listener the mail came in on (`interface_policy`: `SOCK` for any
   Unix socket then the socket's path; the port then `host:port` for TCP);
2. `MYNETS`, when the client address is in `mynetworks` (as the settings
   stand after step 1, so a listener's bank may redefine our networks);
   unknown or missing client addresses count as 0.0.0.0, never ours;
3. the names the client sent (AM.PDP `policy_bank=A,B`), in order. A name no
   bank has is logged and ignored, as amavisd-new does: a client's word is
   not a config error.

A bank applied right after itself is skipped (amavisd-new: "just loaded").
`MYNETS` and `ORIGINATING` are built in and set `originating`; a table of
the same name adds to them. The AM.PDP socket is a trust boundary already:
whoever may connect may choose any bank a site defines, in amavisd-new too.

This module only chooses names and lays values over a Config; what the
pipeline builds from a combination (destinies, rules, notifier) is built
once per combination and cached there (`amavisd.policies`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence

from amavisd.config import Config
from amavisd.config.validators import BUILTIN_BANKS, door_key, is_bank_name

log = logging.getLogger("amavisd.banks")

MAX_BANKS = 16  # names a message may gather; a client may send no more
_UNKNOWN_LOGGED = 100  # distinct unknown names logged at info per process, then debug


def bank_tables(config: Config) -> dict[str, dict]:
    """Every bank: the built-ins under the site's tables of the same name."""
    sites = config.get("policy_banks", {})
    tables = {name: dict(values) for name, values in BUILTIN_BANKS.items()}
    for name, values in sites.items():
        tables[name] = {**tables.get(name, {}), **values}
    return tables


def listener_keys(sock: socket.socket) -> tuple[str, ...]:
    """The interface_policy keys of a connection (or listener), in the order
    their banks load: SOCK then the path; the port then host:port (the
    address the client connected to, IPv6 in brackets)."""
    try:
        name = sock.getsockname()
    except OSError:
        return ()
    if sock.family == socket.AF_UNIX:
        path = name.decode(errors="replace") if isinstance(name, bytes) else name
        return ("SOCK", path) if path else ("SOCK",)
    host, port = name[0], name[1]
    return (str(port), door_key(host.partition("%")[0], port))


def split_names(text: str) -> list[str]:
    """AM.PDP's policy_bank value: comma-separated, blanks around names dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def collapse(names: Iterable[str]) -> tuple[str, ...]:
    """Drop a bank applied right after itself; at most MAX_BANKS."""
    out: list[str] = []
    for name in names:
        if not out or out[-1] != name:
            out.append(name)
    return tuple(out[:MAX_BANKS])


class Networks:
    """`mynetworks`: ordered, first match wins, `!` excludes (amavisd-new's
    lookup_ip_acl)."""

    def __init__(self, entries: Sequence[str]):
        self.entries = []  # (version, network as int, netmask as int, ours?): int tests are fast
        for entry in entries:
            net = ipaddress.ip_network(entry.lstrip("!"))
            self.entries.append((net.version, int(net.network_address), int(net.netmask),
                                 not entry.startswith("!")))

    def __contains__(self, address: str) -> bool:
        ip = client_ip(address)
        if ip is None:
            return False
        version, number = ip.version, int(ip)
        for net_version, network, netmask, mine in self.entries:
            if net_version == version and number & netmask == network:
                return mine
        return False


def client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address as MTAs write it: 10.1.2.3, ::1, [::1], IPv6:::1,
    fe80::1%eth0; an IPv4-mapped IPv6 address is its IPv4 address. None when
    it is none of those."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    text = text.partition("%")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Banks:
    """The banks a config defines, and the choice of them for a message."""

    def __init__(self, config: Config):
        self.base = config
        self.tables = bank_tables(config)
        self.doors: dict[str, str] = {}
        for entry in config.get("interface_policy", []):
            key, _, name = entry.rpartition("=")
            self.doors[key] = name
        self._unknown: set[str] = set()

    def for_listener(self, keys: Iterable[str]) -> tuple[str, ...]:
        return collapse(self.doors[key] for key in keys if key in self.doors)

    def requested(self, text: str, log_id: str = "-") -> list[str]:
        """The defined banks among the names a client sent, in its order."""
        names = []
        for name in split_names(text)[:MAX_BANKS]:
            if name in self.tables:
                names.append(name)
            else:
                self._log_unknown(name, log_id)
        return names

    def _log_unknown(self, name: str, log_id: str) -> None:
        shown = name if is_bank_name(name) else repr(name[:64])
        if name in self._unknown or len(self._unknown) >= _UNKNOWN_LOGGED:
            log.debug("(%s) policy bank %s does not exist, ignored", log_id, shown)
            return
        self._unknown.add(name)
        log.info("(%s) policy bank %s does not exist, ignored", log_id, shown)

    def overlay(self, names: Sequence[str]) -> Config:
        """The config with these banks laid over it, in order."""
        if not names:
            return self.base
        changes: dict = {}
        for name in names:
            changes.update(self.tables[name])
        return self.base.overlay(changes)
