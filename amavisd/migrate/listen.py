"""Where amavisd-new listened, as amavisd's listeners and interface policy.

amavisd-new serves SMTP on `$inet_socket_port` (Debian: 10024) on the
addresses of `$inet_socket_bind` (loopback by default), and a port whose
`$interface_policy{PORT}` bank says `protocol => 'AM.PDP'` (or 'LMTP')
speaks that instead; `$unix_socketname` is the AM.PDP socket (key `SOCK`).
Here: SMTP/LMTP ports are `smtp_listen`, an AM.PDP port is `tcp_listen`, the
socket is `socket`, and `interface_policy` keeps the banks, key for key.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from amavisd.migrate.rows import Row, path, text
from amavisd.migrate.scope import NotTranslated, Scope, known
from amavisd.migrate.values import ArrayRef, HashRef, Unknown, perl_str

READS = ("$inet_socket_port", "$inet_socket_bind", "%interface_policy")
PROTOCOLS = {"SMTP": "", "ESMTP": "", "LMTP": "lmtp:", "AM.PDP": "amavis"}


def _list(value: Any) -> list[Any]:
    if isinstance(value, ArrayRef):
        return list(value.items)
    return [] if value is None else [value]


def _protocol(scope: Scope, bank_name: str | None) -> str:
    banks = scope.get("%policy_bank", {})
    bank = banks.get(bank_name) if bank_name is not None and isinstance(banks, dict) else None
    if not isinstance(bank, HashRef):
        return "SMTP"
    value = perl_str(bank.items.get("protocol", "SMTP"))
    return "?" if isinstance(value, Unknown) else value.upper() or "SMTP"


def _listeners(scope: Scope) -> None:
    policy = scope.get("%interface_policy", {})
    port_var = "$inet_socket_port"
    binds = []
    bind = scope.get("$inet_socket_bind", None)
    if bind is None and scope.assigned("$inet_socket_bind"):
        bind = "0.0.0.0"  # undef: every interface (amavisd-new's @inet_acl then decides)
    for host in _list(bind) or ["127.0.0.1"]:
        host = perl_str(host)
        if isinstance(host, Unknown):
            scope.skip("$inet_socket_bind", host.reason)
            continue
        inner = host.strip("[]")
        binds.append(f"[{inner}]" if ":" in inner else inner)
    smtp: list[str] = []
    amavis: list[str] = []
    for raw in _list(scope.get(port_var, None)):
        port = perl_str(raw)
        if isinstance(port, Unknown) or not (port.isascii() and port.isdigit()) or \
                len(port) > 5 or not 0 < int(port) < 65536:
            scope.skip(port_var, f"{getattr(port, 'reason', port)!r} is not a port number")
            continue
        bank = policy.get(port)
        bank_name = perl_str(bank) if bank is not None else None
        protocol = _protocol(scope, bank_name if isinstance(bank_name, str) else None)
        if protocol not in PROTOCOLS:
            scope.skip(port_var, f"port {port} speaks {protocol}, which amavisd does not")
            continue
        prefix = PROTOCOLS[protocol]
        for host in binds:
            if prefix == "amavis":
                amavis.append(f"{host}:{port}")
            else:
                smtp.append(f"{prefix}{host}:{port}")
    if smtp:
        scope.set("smtp_listen", smtp, port_var,
                  "amavisd-new's SMTP port: the MTA's content_filter points here")
        if any(not _loopback(h) for h in binds):
            scope.set("smtp_listen_remote", True, "$inet_socket_bind",
                      "amavisd-new listened beyond loopback; smtp_allow says who may talk")
    if amavis:
        scope.set("tcp_listen", amavis[0], port_var, "AM.PDP over TCP (a bank's protocol)")
        for extra in amavis[1:]:
            scope.skip(port_var, f"{extra}: amavisd serves AM.PDP on one TCP address")
    _interface_policy(scope, policy)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _interface_policy(scope: Scope, policy: Any) -> None:
    if not isinstance(policy, dict) or not scope.assigned("%interface_policy"):
        return
    entries, problems = [], False
    for key, bank in policy.items():
        name = perl_str(bank)
        if isinstance(name, Unknown) or not name or "=" in key or \
                any(not c.isprintable() or c.isspace() for c in key + name):
            scope.skip("%interface_policy", f"the entry for {key!r} cannot be said as KEY=BANK")
            problems = True
            continue
        entries.append(f"{key}={name}")
    if entries or not problems:
        scope.set("interface_policy", entries, "%interface_policy")


def _socket(scope: Scope) -> None:
    value = scope.get("$unix_socketname")
    if value is None or value == "":
        scope.info("$unix_socketname", "no AM.PDP socket in amavisd-new; amavisd always "
                                       "has one (<workdir>/amavisd.sock by default)")
        return
    try:
        scope.set("socket", path(value), "$unix_socketname")
    except NotTranslated as err:
        scope.skip("$unix_socketname", str(err))


def _inet_acl(scope: Scope) -> None:
    try:
        hosts = [text(h).strip("[]") for h in known(scope.get("@inet_acl"))]
    except NotTranslated as err:
        scope.skip("@inet_acl", str(err))
        return
    if any(h.startswith("!") for h in hosts):
        scope.skip("@inet_acl", "negative entries (!addr) have no equivalent in smtp_allow")
        return
    scope.set("smtp_allow", hosts, "@inet_acl")


def _protocol_key(scope: Scope) -> None:
    protocol = perl_str(scope.get("$protocol"))
    if isinstance(protocol, str) and protocol.upper() in PROTOCOLS:
        scope.info("$protocol", f"{protocol}: said by the listener this bank is bound to")
    else:
        scope.skip("$protocol", f"{protocol!r}: a protocol amavisd does not speak")


ROWS = (
    Row(READS, _listeners, banks=False),
    Row(("$unix_socketname",), _socket, banks=False),
    Row(("@inet_acl",), _inet_acl, banks=False),
    Row(("$protocol",), _protocol_key),
)
