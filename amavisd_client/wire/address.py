"""Socket addresses, written the ways our users write them: one parser.

The daemon listens on them, connects to clamd and to the MTA's re-injection
port with them, and the client and the milter shim connect with them; each
used to read them its own way. The spellings:

    unix:/var/run/clamav/clamd.ctl    a Unix socket (absolute path; also local:)
    tcp:127.0.0.1:3310                TCP host and port
    tcp:[::1]:3310                    an IPv6 host, in brackets
    inet:10024@127.0.0.1              Sendmail's milter spelling (also inet6:)
    127.0.0.1:9998, [::1]:9998        bare host:port, where only TCP makes sense

A caller says which spellings it accepts (a clamd address must say unix: or
tcp:, a loopback listener is a bare host:port), so no setting accepts more
than its documentation says. An address that does not parse raises
`AddressError` (a ValueError) with one line saying what was expected.

Sans-IO and stdlib-free: this only reads strings. It resolves no name and
opens no socket, and imports nothing, so the client (started once a mail)
pays nothing for it.
"""

from __future__ import annotations


class AddressError(ValueError):
    """Not an address in an accepted spelling; the text says which were."""


class Address:
    """A Unix socket path, or a TCP host (no brackets) and port."""

    __slots__ = ("kind", "path", "host", "port")

    def __init__(self, kind: str, path: str = "", host: str = "", port: int = 0):
        self.kind = kind  # "unix" or "tcp"
        self.path = path
        self.host = host
        self.port = port

    @property
    def is_tcp(self) -> bool:
        return self.kind == "tcp"

    @property
    def is_ipv6(self) -> bool:
        """A literal IPv6 host: the caller needs an AF_INET6 socket for it."""
        return ":" in self.host

    @property
    def target(self) -> str | tuple[str, int]:
        """What socket.connect() and bind() take: the path, or (host, port)."""
        return (self.host, self.port) if self.is_tcp else self.path

    def __str__(self) -> str:
        if not self.is_tcp:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return f"tcp:{host}:{self.port}"

    def __repr__(self) -> str:
        return f"Address({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return (self.kind, self.path, self.host, self.port) == (
            other.kind, other.path, other.host, other.port)

    def __hash__(self) -> int:
        return hash((self.kind, self.path, self.host, self.port))


def parse_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise AddressError(f"bad port {text!r}: must be 1 to 65535")
    return int(text)


def parse_host(text: str) -> str:
    """A host name or literal IP, with the brackets of `[v6]` taken off."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text or "[" in text or "]" in text or not text.isprintable() or " " in text:
        raise AddressError(f"bad host {text!r}")
    return text


def parse_host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` (a bare `::1:port` too: the last colon
    ends the host)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{text!r}: expected host:port")
    return parse_host(host), parse_port(port)


def _unix(rest: str) -> Address:
    if not rest.startswith("/"):
        raise AddressError(f"{rest!r}: a Unix socket needs an absolute path")
    return Address("unix", path=rest)


def _tcp(rest: str) -> Address:
    host, port = parse_host_port(rest)
    return Address("tcp", host=host, port=port)


def _inet(rest: str) -> Address:
    port, sep, host = rest.partition("@")
    if not sep:
        raise AddressError(f"{rest!r}: expected port@host")
    return Address("tcp", host=parse_host(host), port=parse_port(port))


# Each prefix and what follows it. "bare" (no prefix) is host:port.
SCHEMES = {
    "unix": _unix,
    "local": _unix,  # Sendmail's name for it
    "tcp": _tcp,
    "inet": _inet,  # Sendmail's inet:port@host
    "inet6": _inet,
}
BARE = "bare"
SPELLINGS = {"unix": "unix:/path", "local": "local:/path", "tcp": "tcp:host:port",
             "inet": "inet:port@host", "inet6": "inet6:port@host", BARE: "host:port"}


def parse(text: str, accept: tuple[str, ...] = (*SCHEMES, BARE)) -> Address:
    """`text` in one of the spellings named in `accept` (keys of SCHEMES,
    and BARE for host:port / [v6]:port without a prefix)."""
    scheme, sep, rest = text.partition(":")
    if sep and scheme in SCHEMES:
        if scheme in accept:
            return SCHEMES[scheme](rest)
    elif BARE in accept:
        return _tcp(text)
    spelled = " or ".join(SPELLINGS[name] for name in accept)
    raise AddressError(f"{text!r}: expected {spelled}")


def parse_or_path(text: str) -> Address:
    """The client's -s: any spelling above, else a Unix socket path as given
    (relative too). A bare `host:port` is TCP only when it holds no "/" and
    ends in digits, so `var/lib/amavisd.sock` stays a path."""
    scheme, sep, rest = text.partition(":")
    if sep and scheme in SCHEMES:
        return SCHEMES[scheme](rest)
    host, sep, port = text.rpartition(":")
    if sep and host and port.isascii() and port.isdigit() and "/" not in text:
        return _tcp(text)
    return Address("unix", path=text)
