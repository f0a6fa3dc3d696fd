"""Encodings that live inside text, and mail-borne formats without MIME.

- uuencode: `begin 644 name` ... `end` blocks anywhere in a text body,
  several per body (the text itself is still scanned).
- yEnc: `=ybegin ... name=x` ... `=yend` blocks, found and cut out the same
  way (decoded by `decode.yenc`); each part of a multi-part set is a child.
- BinHex 4.0: as an attachment, or pasted into a text body.
- base64 with no headers at all (a body that is nothing but base64 lines).
- TNEF (winmail.dat): attached files, bodies and embedded messages.

A big text part (a spilled one, mapped: `decode.window`) is searched a
window at a time and its uuencoded blocks and MIME readings are written
to their parts' files as they are decoded, never held whole.
"""

from __future__ import annotations

import binascii
import itertools
import re
from collections.abc import Iterator

from amavisd.decode import window, yenc
from amavisd.decode.limits import LimitExceeded
from amavisd.decode.parts import Part, declared_name
from amavisd.decode.registry import Context, DecodeError, add_streamed, register

_UU_BEGIN = re.compile(rb"^begin(?:-base64)? +([0-7]{3,4}) +([^\r\n]*)\r?$", re.M)
_UU_END = re.compile(rb"^end\r?$", re.M)
# A begin line at the very start of a span: a body after a bare-CR header end
# is a line start that `^` (after LF only) does not see in the whole message.
_UU_BEGIN_HERE = re.compile(_UU_BEGIN.pattern[1:], re.M)
MAX_TEXT_SCAN = 64 * 1024 * 1024  # text bodies larger than this are not searched for blocks


_MIME_BOUNDARY = re.compile(
    rb"^--([ -~]{1,70}?)[ \t]*\r?\n(?:[!-9;-~]+:[^\n]*\r?\n(?:[ \t][^\n]*\r?\n)*)*?"
    rb"content-(?:type|transfer-encoding|disposition)[ \t]*:", re.I | re.M)
MAX_BOUNDARIES = 4
# Where a match of each may start: a line that begins with this literal.
# The patterns themselves have unbounded runs (spaces, header lines) that a
# window edge would cut, so each start is then tried against the real end.
_STARTS = {_UU_BEGIN: b"begin", _MIME_BOUNDARY: b"--"}
# _MIME_BOUNDARY's parts: a "--" line, then the run of header lines after it
_BOUNDARY_LINE = re.compile(rb"--[ -~]{1,70}?[ \t]*\r?\n")
_HEADER_LINES = re.compile(rb"(?:[!-9;-~]+:[^\n]*\r?\n(?:[ \t][^\n]*\r?\n)*)*+")


def _search(pattern: re.Pattern[bytes], data: window.Buffer, pos: int = 0,
            end: int | None = None) -> re.Match[bytes] | None:
    """`pattern.search` of a line-anchored pattern of unbounded length: each
    possible start found (`line_start`, a window at a time on a mapping: a
    windowed search of the whole pattern would miss a match whose unbounded
    run straddles a window edge), then tried against the real end. Linear: a "--" line
    whose run of header lines has no Content-* field fails, and so does
    every "--" line inside that run (its run is a tail of the same one), so
    they are skipped; the plain regex search tried each of them, quadratic
    (48 KB of "--a:b" lines took 6 s, a 1 MiB text most of an hour)."""
    end = len(data) if end is None else end
    literal = _STARTS[pattern]
    while (at := line_start(data, literal, pos, end)) >= 0:
        if (match := pattern.match(data, at, end)) is not None:
            return match
        pos = at + 1
        if pattern is _MIME_BOUNDARY and (line := _BOUNDARY_LINE.match(data, at, end)):
            pos = max(pos, _HEADER_LINES.match(data, line.end(), end).end())
    return None


def line_start(data: window.Buffer, literal: bytes, pos: int, end: int) -> int:
    """Where the first line in data[pos:end] that begins with `literal`
    begins (re.M's `^literal`: at 0 or after a LF), or -1. Found as
    LF + literal by bytes.find: the regex engine tried `^` at every byte
    (17 us on a 4 KiB text, 4 ms a MiB), find skips in C; each hit is a
    line start, so no Python step is spent on a non-candidate."""
    if pos >= end:
        return -1
    if (pos == 0 or data[pos - 1:pos] == b"\n") and data[pos:pos + len(literal)] == literal \
            and pos + len(literal) <= end:
        return pos
    at = window.find(data, b"\n" + literal, max(pos - 1, 0), end)
    return at + 1 if at >= 0 else -1


def has_embedded(part: Part) -> bool:
    if part.size > MAX_TEXT_SCAN:
        return False
    with part.mapped() as data:
        return (_search(_UU_BEGIN, data) is not None
                or has_yenc(data)
                or window.find(data, b"(This file must be converted") >= 0
                or (window.find(data, b"\n--") >= 0
                    and _search(_MIME_BOUNDARY, data) is not None))


def _inside_reading(part: Part) -> bool:
    node: Part | None = part
    while node is not None:
        if "mime-reading" in node.flags:
            return True
        node = node.parent
    return False


def mime_readings(data: bytes) -> list[bytes]:
    """Boundary-delimited MIME parts inside a text body: the structure a mail
    client may see where our parser saw none (e.g. `Content-Type(x):` header
    tricks). Each boundary found gives one multipart reading to decode."""
    return [head + data for head in reading_heads(data)]


def reading_heads(data: window.Buffer) -> list[bytes]:
    """The header block of each multipart reading of `data` (see mime_readings)."""
    found: dict[bytes, None] = {}
    pos = 0
    while len(found) < MAX_BOUNDARIES and (
            m := _search(_MIME_BOUNDARY, data, pos)) is not None:
        found.setdefault(m.group(1).rstrip(b"-").strip() or m.group(1))
        pos = m.end()
    return [b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="' + b.replace(
        b'"', b"") + b'"\n\n' for b in found]


@register("text", probe=has_embedded)
def decode_text(part: Part, ctx: Context) -> None:
    with part.mapped() as data:
        if window.mapped(data):
            _decode_big_text(part, data, ctx)
            return
        allowance = ctx.budget.allowance()
        for name, start, stop, ended in list(uu_blocks(data, 0, len(data))):
            decoded = UUDecoding(data, start, stop, allowance, name)  # by windows: a
            payload = window.gather(decoded)  # line object a line would cost 20x the text
            child = ctx.add(part, payload, name=name, mime_type="application/octet-stream")
            if not (decoded.ok and ended):
                child.flags.add("decode-error")
        yenc_in_text(part, data, ctx)
        if not _inside_reading(part):  # a reading's own text gets no further readings
            for reading in mime_readings(data):
                part.flags.add("ambiguous")
                child = ctx.add(part, reading, name="(MIME structure found in text)",
                                mime_type="message/rfc822", detected="mail")
                child.flags.add("mime-reading")
        _binhex_in_text(part, data, ctx)


def _decode_big_text(part: Part, data: window.Buffer, ctx: Context) -> None:
    """decode_text for a mapped part: the same children, each streamed to its file."""
    allowance = ctx.budget.allowance()
    for name, start, stop, ended in uu_blocks(data, 0, len(data)):
        decoded = UUDecoding(data, start, stop, allowance, name)
        child = add_streamed(ctx, part, decoded, name=name,
                             mime_type="application/octet-stream")
        if not (decoded.ok and ended):
            child.flags.add("decode-error")
    yenc_in_text(part, data, ctx)
    if not _inside_reading(part):
        for head in reading_heads(data):
            part.flags.add("ambiguous")
            body = window.chunks(data, 0, len(data))
            child = add_streamed(ctx, part, itertools.chain([head], body),
                                 name="(MIME structure found in text)",
                                 mime_type="message/rfc822", detected="mail")
            child.flags.add("mime-reading")
    _binhex_in_text(part, data, ctx)


def _binhex_in_text(part: Part, data: window.Buffer, ctx: Context) -> None:
    if window.find(data, b"BinHex") >= 0 or window.find(data, b"(This file must be converted") >= 0:
        from amavisd.decode import binhex

        if window.mapped(data):  # find_binhex wants bytes (`in`); rare: a copy, once
            data = data[:]
        for start, end in binhex.find_binhex(data):
            add_binhex(part, data[start:end], ctx)


_YBEGIN = b"=ybegin "
MAX_YLINE = 8192  # a longer =y line is read at its two ends (the name's ends count)


class YBlock:
    """One `=ybegin` ... `=yend` block of a text: its fields, where its data
    lines start and stop, and (once iterated) its decoding."""

    def __init__(self, data: window.Buffer, start: int, end: int) -> None:
        self.begin = yenc.keywords(_yline(data, start, end))
        self.name = declared_name(self.begin.get("name", b"").decode("latin-1").strip())
        self.start = _next_line(data, start, end)
        self.part: dict[str, bytes] | None = {} if "part" in self.begin else None
        if data[self.start:self.start + 7] == b"=ypart ":
            self.part = yenc.keywords(_yline(data, self.start, end))
            self.start = _next_line(data, self.start, end)
        again = line_start(data, _YBEGIN, self.start, end)  # searched up to the next
        until = end if again < 0 else again  # block only: linear in blocks without =yend
        # Thunderbird ends a block only at "=yend size=": a bare "=yend" line
        # is data to it, so it must be to us (else its file is one we never saw)
        stop = line_start(data, b"=yend size=", self.start, until)
        self.ended = stop >= 0
        self.stop = stop if self.ended else until
        self.end = yenc.keywords(_yline(data, stop, end)) if self.ended else None
        self.after = _next_line(data, stop, end) if self.ended else self.stop
        self.decoder = yenc.Decoder()

    def decoding(self, data: window.Buffer, max_output: int) -> Iterator[bytes]:
        """The decoded bytes, a line-aligned window at a time; LimitExceeded
        past `max_output`, as UUDecoding."""
        for a, b in window.spans(data, self.start, self.stop):
            yield self.decoder.feed(data[a:b])
            if self.decoder.size > max_output:  # not a decode error: a file we did not see
                raise LimitExceeded(f"yEnc block {self.name!r} over the expansion quota")


def _next_line(data: window.Buffer, pos: int, end: int) -> int:
    at = window.find(data, b"\n", pos, end)
    return end if at < 0 else at + 1


def _yline(data: window.Buffer, pos: int, end: int) -> bytes:
    """A =y line; a long one as its start, its name's start and its end
    (clip_name keeps a name's ends: padding cannot push ".exe" out)."""
    stop = _next_line(data, pos, end)
    if stop - pos <= MAX_YLINE:
        return data[pos:stop]
    cut = pos + MAX_YLINE // 2
    name = window.find(data, b" name=", cut, stop)
    middle = b"" if name < 0 else data[name:min(name + MAX_YLINE // 4, stop)]
    return data[pos:cut] + middle + data[max(stop - MAX_YLINE // 4, cut):stop]


def y_blocks(data: window.Buffer, start: int, end: int) -> Iterator[YBlock]:
    """Each yEnc block in data[start:end]: a `=ybegin ` line start to its
    `=yend` line (or to the next `=ybegin`, or the end, when that is missing)."""
    pos = start
    while (at := line_start(data, _YBEGIN, pos, end)) >= 0:
        block = YBlock(data, at, end)
        yield block
        pos = block.after


def has_yenc(data: window.Buffer) -> bool:
    return line_start(data, _YBEGIN, 0, len(data)) >= 0


def yenc_in_text(part: Part, data: window.Buffer, ctx: Context) -> None:
    """Each yEnc block of the text as a child (streamed to its file from a
    mapping): decode-error when a check fails, partial (so UNCHECKED) when
    it is one part of a multi-part file, whose whole is never scanned."""
    allowance = ctx.budget.allowance()
    for block in y_blocks(data, 0, len(data)):
        fields = {"name": block.name, "mime_type": "application/octet-stream"}
        chunks = block.decoding(data, allowance)
        child = (add_streamed(ctx, part, chunks, **fields) if window.mapped(data)
                 else ctx.add(part, window.gather(chunks), **fields))
        if block.decoder.problems(block.begin, block.part, block.end):
            child.flags.add("decode-error")
        total = yenc.number(block.begin, "total")
        if block.part is not None and total != 1:
            child.flags.add("partial")
            ctx.note_unchecked(child, f"yEnc part {yenc.number(block.begin, 'part')} of "
                                      f"{total or '?'}", kind="partial")


def uu_blocks(data: window.Buffer, start: int, end: int
              ) -> Iterator[tuple[str, int, int, bool]]:
    """Each `begin` ... `end` block in data[start:end]: (name, where its
    lines start, where they stop, whether its `end` line was found)."""
    pos = start
    while match := (pos == start and _UU_BEGIN_HERE.match(data, pos, end)
                    or _search(_UU_BEGIN, data, pos, end)):
        stop_line = window.search(_UU_END, data, match.end(), end)
        stop = stop_line.start() if stop_line else end
        name = declared_name(match.group(2).decode("latin-1").strip())
        yield name, match.end(), stop, stop_line is not None
        pos = stop_line.end() if stop_line else end


def uudecode_body(data: window.Buffer, start: int, end: int, max_output: int
                  ) -> Iterator[bytes]:
    """decode_uuencode's output streamed: its blocks, or without any its lines."""
    blocks = list(uu_blocks(data, start, end))
    if not blocks:
        yield from UUDecoding(data, start, end, max_output)
    for name, a, b, _ in blocks:
        yield from UUDecoding(data, a, b, max_output, name)


class UUDecoding:
    """uudecode_lines over data[start:end], a line-aligned window at a time;
    `ok` once iterated. LimitExceeded past `max_output`, as uudecode_lines."""

    def __init__(self, data: window.Buffer, start: int, end: int, max_output: int,
                 name: str = "") -> None:
        self.data, self.start, self.end = data, start, end
        self.max_output, self.name = max_output, name
        self.ok = True

    def __iter__(self) -> Iterator[bytes]:
        produced = 0
        for a, b in window.spans(self.data, self.start, self.end):
            out, ok = uudecode_lines(self.data[a:b], self.max_output - produced, self.name)
            self.ok &= ok
            produced += len(out)
            yield out


def find_uuencoded(data: bytes, max_output: int) -> list[tuple[str, bytes, bool]]:
    """Every uuencoded block: (name, decoded bytes, all lines decoded cleanly)."""
    found = []
    pos = 0
    while match := _UU_BEGIN.search(data, pos):
        end = _UU_END.search(data, match.end())
        stop = end.start() if end else len(data)
        name = declared_name(match.group(2).decode("latin-1").strip())
        payload, ok = uudecode_lines(data[match.end():stop], max_output, name)
        found.append((name, payload, ok and end is not None))
        pos = end.end() if end else len(data)
    return found


def uudecode_lines(body: bytes, max_output: int, name: str = "") -> tuple[bytes, bool]:
    """Decode uuencoded lines, skipping any line too short for the length it
    declares (a cut-off `end`, a signature): binascii would pad it with zeros."""
    out = bytearray()
    ok = True
    for line in body.splitlines():
        line = line.rstrip(b"\r")
        if not line.strip() or line in (b"end", b"`"):
            continue
        count = (line[0] - 32) & 63
        if len(line) - 1 < (count * 4 + 2) // 3:
            ok = False
            continue
        try:
            out += binascii.a2b_uu(line[: 1 + (count * 4 + 2) // 3 + 3])
        except binascii.Error:
            try:  # some encoders drop trailing padding: trust the length byte
                out += binascii.a2b_uu(line[: 1 + (count * 4 + 2) // 3])
            except binascii.Error:
                ok = False
        if len(out) > max_output:
            # not a decode error: a file we did not see (UNCHECKED, never CLEAN)
            raise LimitExceeded(f"uuencoded block {name!r} over the expansion quota")
    return bytes(out), ok


@register("binhex")
def decode_binhex_part(part: Part, ctx: Context) -> None:
    from amavisd.decode import binhex

    data = part.read()
    spans = binhex.find_binhex(data) or [(0, len(data))]
    for start, end in spans:
        add_binhex(part, data[start:end], ctx)
    part.flags.add("expanded")


def add_binhex(parent: Part, block: bytes, ctx: Context) -> None:
    from amavisd.decode import binhex

    try:
        decoded = binhex.decode_binhex(block, ctx.budget.allowance())
    except binhex.BinHexError as err:
        raise DecodeError(f"BinHex: {err}") from None
    for fork, suffix in ((decoded.data, ""), (decoded.resource, " (resource fork)")):
        if fork or not suffix:
            child = ctx.add(parent, fork, name=decoded.name + suffix,
                            mime_type="application/octet-stream")
            if not decoded.crc_ok:
                child.flags.add("decode-error")
            if decoded.truncated:
                child.flags.add("truncated")


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")
# the same bytes, for translate(): one pass and one output (a regex sub over
# base64 lines builds a piece per line end: 1 MB of lines took 17 MiB)
_NOT_BASE64_BYTES = bytes(c for c in range(256) if _NOT_BASE64.match(bytes([c])))


@register("base64")
def decode_bare_base64(part: Part, ctx: Context) -> None:
    with part.mapped() as data:
        if window.mapped(data) and window.find(data, b"=") < 0:
            child = add_streamed(ctx, part, _bare_base64_windows(data), name=part.name)
            if child.size:
                part.flags.add("expanded")
            else:  # as below: nothing decoded, no child (the budget was charged, as it is)
                part.children.remove(child)
            return
        try:
            digits = window.gather(data[a:b].translate(None, _NOT_BASE64_BYTES)
                                   for a, b in window.spans(data, 0, len(data)))
            decoded = binascii.a2b_base64(digits)
        except binascii.Error as err:
            raise DecodeError(f"base64: {err}") from None
    if decoded:
        ctx.add(part, decoded, name=part.name)
        part.flags.add("expanded")


def _bare_base64_windows(data: window.Buffer) -> Iterator[bytes]:
    """decode_bare_base64 a window at a time, for a body without "=" (where
    the stdlib's lenient decoder stops is then not a question)."""
    carry = b""
    for a, b in window.spans(data, 0, len(data)):
        digits = carry + data[a:b].translate(None, _NOT_BASE64_BYTES)
        whole = len(digits) - len(digits) % 4
        carry = digits[whole:]
        yield binascii.a2b_base64(digits[:whole])
    if carry:
        raise DecodeError("base64: Incorrect padding")


@register("tnef")
def decode_tnef(part: Part, ctx: Context) -> None:
    from amavisd.decode import tnef

    try:
        content = tnef.parse_tnef(part.read(), ctx.budget.allowance())
    except tnef.TnefError as err:
        raise DecodeError(f"TNEF: {err}") from None
    part.flags.add("expanded")
    for attachment in content.attachments:
        child = ctx.add(part, attachment.data, name=attachment.name,
                        mime_type=attachment.mime_type or "application/octet-stream",
                        alt_names=attachment.alt_names)
        if attachment.embedded_message:
            child.flags.add("embedded-message")
    for body, mime_type in ((content.body_text, "text/plain"), (content.body_html, "text/html"),
                            (content.body_rtf, "text/rtf")):
        if body:
            ctx.add(part, body, name="(tnef body)", mime_type=mime_type)
    if content.truncated:
        part.flags.add("truncated")
