"""yEnc (http://www.yenc.org/yenc-draft.1.3.txt): decoding and its checks, sans I/O.

Why: mail clients (Thunderbird) decode a `=ybegin ... =yend` block found in
a text body into an attachment; unless we decode it too, that file is never
scanned nor named to the banned rules. textual.py finds the blocks (as it
finds uuencode) and feeds their data lines here a window at a time.

A data byte is the file's byte plus 42 (mod 256); a critical one is sent as
"=" then that sum plus 64. CR and LF are line breaks, never data. An "=" at
a line's end has lost the byte it escapes (a decode error). The output is
never longer than the input: a bound the caller's budget can rely on.

MIT License; our own code from the format's description.
"""

from __future__ import annotations

import re
import zlib

PIECE = 64 * 1024  # bytes decoded at once
_PLAIN = bytes((c - 42) & 255 for c in range(256))
_SHIFTED = tuple(bytes(((c - 64) & 255,)) for c in range(256))  # an escaped byte, unshifted
_NAME = re.compile(rb"(?:^|[ \t])name=(.*)", re.S)
_KEYWORD = re.compile(rb"([a-z0-9]+)=([^ \t\r\n]*)")


def keywords(line: bytes) -> dict[str, bytes]:
    """The `key=value` fields of a =ybegin, =ypart or =yend line; `name`
    is the rest of the line (it may hold spaces), CR/LF stripped."""
    line = line.rstrip(b"\r\n")
    name = _NAME.search(line)
    head = line[:name.start()] if name else line
    fields = {m.group(1).decode("ascii"): m.group(2) for m in _KEYWORD.finditer(head.lower())}
    if name:
        fields["name"] = name.group(1)
    return fields


def number(fields: dict[str, bytes], key: str, base: int = 10) -> int | None:
    """An integer field (base 16 for the crc fields), None if absent or malformed."""
    value = fields.get(key, b"")
    try:
        return int(value, base) if 0 < len(value) < 24 else None
    except ValueError:
        return None


class Decoder:
    """Data lines in, bytes out (`feed`, as often as wanted, ending each
    time at a line end); `size`, `crc` and `ok` (no cut-off escape) so far."""

    def __init__(self) -> None:
        self.size, self.crc, self.ok = 0, 0, True

    def feed(self, lines: bytes) -> bytes:
        """A long input (one line can be the whole message) goes a piece at a
        time: each escape costs two small objects while a piece is decoded
        (a 20 MB line of escapes took 1 GB whole). A piece never ends in an
        odd run of "=": the escaped byte comes along."""
        if len(lines) <= PIECE:
            return self._feed(lines)
        out, pos = [], 0
        while pos < len(lines):
            end = min(pos + PIECE, len(lines))
            piece = lines[pos:end]
            if end < len(lines) and (len(piece) - len(piece.rstrip(b"="))) % 2:
                end += 1
                piece = lines[pos:end]
            out.append(self._feed(piece))
            pos = end
        return b"".join(out)

    def _feed(self, lines: bytes) -> bytes:
        # "==" is an escaped "=" (a run pairs from its start); any other "="
        # then escapes the one byte after it, unless a line end comes first.
        # Each escaped byte is shifted by 64 and the whole translated once: a
        # step per escape in Python cost 17 s for 64 MiB of escapes, this 5.
        lines = lines.replace(b"==", _SHIFTED[61])
        if b"=\r" in lines or b"=\n" in lines or lines.endswith(b"="):
            self.ok = False  # the escaped byte is gone: drop the "="
            lines = lines.replace(b"=\r", b"\r").replace(b"=\n", b"\n").removesuffix(b"=")
        first, *escaped = lines.translate(None, b"\r\n").split(b"=")
        if escaped:
            first += b"".join([_SHIFTED[run[0]] + run[1:] for run in escaped])
        out = first.translate(_PLAIN)
        self.size += len(out)
        self.crc = zlib.crc32(out, self.crc)
        return out

    def problems(self, begin: dict[str, bytes], part: dict[str, bytes] | None,
                 end: dict[str, bytes] | None) -> list[str]:
        """What does not add up once the block is decoded (empty: all checked out)."""
        found = [] if self.ok else ["an escape cut off at a line end"]
        if end is None:
            return [*found, "no =yend line"]
        sizes = [number(end, "size")]
        if part is None:  # a whole file: =ybegin's size is this block's too
            sizes.append(number(begin, "size"))
        else:
            first, last = number(part, "begin"), number(part, "end")
            sizes.append(last - first + 1 if first is not None and last is not None else None)
        found += [f"size {want} declared, {self.size} decoded"
                  for want in sizes if want is not None and want != self.size]
        crcs = [number(end, "pcrc32", 16)] + ([number(end, "crc32", 16)] if part is None else [])
        found += [f"crc32 {want:08x} declared, {self.crc:08x} decoded"
                  for want in crcs if want is not None and want != self.crc]
        return found
