"""Load, before privileges drop, everything a worker may import later.

Why: the daemon starts as root and becomes `amavis`. If the interpreter's
files (the stdlib, a venv's site-packages) are readable by root only, any
import after the drop fails: a zip member named in cp437, a Joliet ISO
(utf-16-be), a TNEF title (cp1252), an admin notice (smtplib asks for the
`idna` codec), a 7z (py7zr imports psutil on first use) would each break a
decoder in the middle of a message. The engine turns that into UNCHECKED,
never CLEAN, but a zip holding a virus must be INFECTED, and a notice must
be sent. So `cmd_run` calls `preload()` once, as root and before the first
fork: the workers inherit the loaded modules (copy-on-write pages), and no
path a message can take needs the filesystem for code.

What gets loaded, one table a concern:
- `MODULES`: modules our code or its libraries import lazily, inside a
  function (decoders reached through another decoder, email's generator,
  smtplib's ssl, python-magic, psutil, py7zr's codecs);
- every module of the `encodings` package: a message may name any charset
  in a header or a part, and a codec is found by importing its module;
- `EXERCISES`: pieces that load on first use rather than on import
  (libmagic's database, py7zr's memory probe, OpenSSL's digests, the idna
  codec that socket.getaddrinfo asks for).

It must never fail the boot: an optional library that is missing now is
missing after the drop too, and the code that uses it already copes. It
must never read a message or touch the network (numeric addresses only).
"""

from __future__ import annotations

import codecs
import encodings
import hashlib
import importlib
import logging
import pkgutil
import socket
import time
from collections.abc import Callable

log = logging.getLogger("amavisd")

# Imported inside functions somewhere below a worker: a table, not a scan of
# the code, so a reader sees why each one is here. Missing ones are skipped.
MODULES: dict[str, str] = {
    # ours: the master imports the pipeline; these are reached lazily
    "amavisd.pipeline": "the whole message path, every decoder registered",
    "amavisd.decode.binhex": "textual.py finds BinHex inside text parts",
    "amavisd.decode.tnef": "textual.py and mime.py hand winmail.dat over",
    "amavisd.decode.external": "external unpackers, for archives and compressors",
    "amavisd.quarantine.release": "AM.PDP release requests",
    "amavisd.policy.destinies": "config validation on HUP",
    "amavisd.policy.banned": "config validation on HUP",
    "amavisd.scan.scanners": "config validation on HUP",
    "amavisd.actions.forward": "config validation on HUP",
    # metrics (after metrics.setup() chose the library's multiprocess storage)
    "prometheus_client": "the metrics library, for every process",
    "prometheus_client.multiprocess": "the master merges and folds the workers' files",
    "amavisd.observe.exporter": "the master's /metrics, /healthz and /status thread",
    # the standard library
    "email.generator": "Message.as_bytes() imports it on first use (notices, DSNs)",
    "email.iterators": "Message.walk()",
    "email.headerregistry": "header values parsed with policy.default",
    "email.contentmanager": "get_content()/set_content() of notices",
    "email._header_value_parser": "addresses and RFC 2231 parameters",
    "smtplib": "notices and releases",
    "ssl": "smtplib imports it lazily",
    "stringprep": "the idna codec",
    "unicodedata": "the idna codec, NFKC of names",
    "gzip": "quarantine_gzip",
    "json": "quarantine metadata",
    "zlib": "deflate in zip, gzip, 7z, ISO zisofs",
    "bz2": "bzip2 members and streams",
    "lzma": "xz, lzma, 7z LZMA/LZMA2",
    "lz4.frame": "lz4 streams",
    "lz4.block": "lz4 legacy frames",
    "backports.zstd": "zstd before Python 3.14",
    "compression.zstd": "zstd from Python 3.14",
    "inflate64": "deflate64 zip members",
    "pyppmd": "PPMd in 7z and zip",
    "bcj": "7z branch filters",
    "Cryptodome.Cipher.AES": "7z AES (to tell encrypted from broken)",
    "brotli": "py7zr's optional brotli filter",
    "psutil": "py7zr sizes its buffers with it on first use",
    "magic": "python-magic, for --tree and banned-type rules",
    "olefile": "OLE2 documents",
    "rarfile": "RAR",
    "py7zr": "7z",
    "resource": "limits of external tools",
}


def _import(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # optional, for another Python, or its C library is missing:
        return False  # absent after the drop too, and the code using it copes
    return True


def import_encodings() -> int:
    """Every codec module: a message chooses its charsets, we do not."""
    loaded = 0
    for info in pkgutil.iter_modules(encodings.__path__):
        try:
            importlib.import_module(f"encodings.{info.name}")
            loaded += 1
        except (ImportError, LookupError):  # mbcs, oem: Windows only
            pass
    return loaded


# Codecs our code names literally, looked up so the registry caches them.
CODECS = ("ascii", "latin-1", "utf-8", "utf-16-le", "utf-16-be", "cp437", "cp1252",
          "mac_roman", "idna", "punycode")


def _codecs() -> None:
    for name in CODECS:
        codecs.lookup(name)
    "scanner.example.test".encode("idna")


def _resolver() -> None:
    # socket.getaddrinfo() encodes a str host with the idna codec, in C.
    socket.getaddrinfo("127.0.0.1", 25, type=socket.SOCK_STREAM)


def _libmagic() -> None:
    from amavisd.decode import detect

    detect.magic_mime(b"")  # opens libmagic and its database, kept for the process


def _py7zr_memory() -> None:
    from py7zr.properties import get_memory_limit

    get_memory_limit()  # imports resource and psutil, reads /proc/meminfo


def _digests() -> None:
    for name in ("md5", "sha1", "sha256"):
        hashlib.new(name, b"")


EXERCISES: dict[str, Callable[[], None]] = {
    "codecs": _codecs,
    "resolver": _resolver,
    "libmagic": _libmagic,
    "py7zr": _py7zr_memory,
    "digests": _digests,
}


def preload() -> None:
    """Import and warm up everything above; log what it cost. Never raises
    for a missing or failing piece: it logs it and goes on."""
    started = time.perf_counter()
    missing = [name for name in MODULES if not _import(name)]
    count = import_encodings()
    for name, exercise in EXERCISES.items():
        try:
            exercise()
        except Exception as err:  # the boot goes on; the code using it copes as before
            log.warning("preload: %s: %s", name, err)
    log.info("preloaded %d modules and %d codecs in %.0f ms", len(MODULES) - len(missing),
             count, (time.perf_counter() - started) * 1000)
    if missing:  # compression.zstd before Python 3.14, say
        log.debug("preload: not available: %s", ", ".join(missing))
