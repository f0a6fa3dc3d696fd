"""Single-stream compressors: gzip, bzip2, xz, lzma (alone), lzip, zstd, lz4, compress (.Z).

In-process (all but big .Z files), each behind one small decompressor protocol
(`decompress(data, max_length)`, `eof`, `needs_input`, `unused_data`, and
optionally `end_of_input()` for formats with no end marker), driven by one
loop, `stream()`; the ones written here (gzip and lzip members, lz4 frames,
LZW) live in decompressors.py. Output comes in bounded chunks charged to the
budget as it comes, so a 4 GiB stream of zeros stops at the quota, in
constant memory.

Why in-process, with the figures (2-core machine, per file, best of 5):
- gzip/bzip2/xz/lzma/lzip: zlib, bz2 and lzma are in the standard library; a
  fork of gzip(1) alone costs more than decoding a typical attachment. gzip
  is raw deflate between our own header and trailer reading (40 MiB of text:
  62 ms, zlib's gzip mode 54 ms; a 1 KiB file 16 us against 12 us).
  lzip is lzma's raw LZMA1 decoder (it accepts lzip's end marker) fed from
  the lzip header, checked against the member trailer's CRC32 and size.
- zstd: backports.zstd (compression.zstd on Python >= 3.14), which also skips
  skippable frames; window limited by the library default (128 MiB).
- lz4: the lz4 package's frame decoder; the legacy format and skippable frames
  are read here, the legacy blocks with lz4.block.
- compress: our own LZW (`LzwDecompressor`) against gzip(1) -d run boxed
  through external.run_tool (copy in, run, read back); same output on all:
      file (compressed -> out)              in-process   gzip(1)
      t.txt.Z (6 B -> 2 B)                     0.2 ms     5-26 ms
      t.tar.Z (284 B -> 10 KiB)                0.4 ms     5-20 ms
      iso_multi_extent.iso.Z (2.7 -> 620 KiB)  2.6 ms    12 ms
      text (57 KiB -> 138 KiB)                  17 ms      9 ms
      test_C1.Z (107 KiB -> 149 KiB)            41 ms     27 ms
      code (171 KiB -> 432 KiB)                 77 ms     27 ms
      binary (1.5 MiB -> 2.5 MiB)              401 ms     33 ms
      zeros (15 KiB -> 48 MiB, bomb-like)       63 ms    147 ms
  So both: in-process below LZW_TOOL_FROM (64 KiB) compressed, where the
  tool's fork and run_tool's 20 ms poll dominate (highly repetitive data,
  bombs included, is small when compressed); gzip above, where Python's
  per-code loop (~0.25 s per MiB compressed) loses. When
  gzip finds the stream corrupt it deletes its output, so we decode again
  in-process to keep what precedes the damage. Without gzip, in-process.

Damaged streams (fail closed, and scan all there is):
- a member whose data decoded but whose check value (gzip CRC-32 and size,
  lzip CRC-32 and size) does not match is kept whole, flagged `corrupt`, and
  decoding goes on with the next member: the bytes are what `gzip -dc`
  gives, so nothing is hidden from the scanners; the part gets decode-error,
  the message is not UNCHECKED for it. gzip and lzip are read here member
  by member (header, raw deflate/LZMA1, trailer) so the check comes after
  the output, never instead of it;
- a stream cut short keeps what came before the cut (`truncated`);
- zero bytes between members are padding, however many: Python's gzip
  module reads on past them to a further member (gzip(1) stops), so we do
  too, for every multi-member format;
- bytes after the last member that do not start another member are
  trailing data (decode-error; the part is scanned as it is too), unless a
  member's signature (`SIGNATURES`) appears in them: a member a reader that
  skips garbage would find, which we did not read, so `Undecipherable`;
- any other error (corrupt data, or a check the library tests before it
  hands out the data: bzip2, xz, zstd, lz4 frames) loses what the library
  had decoded in that call, so the stream is read a second time by its own
  tool, boxed, told to ignore checks (`SALVAGERS`: 7zz for bzip2, `xz
  --ignore-check`, `zstd --no-check`, ...), and its output becomes a second
  child when it holds more. If that tool read the stream to its end (only a
  check failed) the part is flagged decode-error; otherwise some content
  could not be produced by anyone here: `Undecipherable`, the message is
  UNCHECKED (kind undecipherable) with everything that was read scanned.
Never catch what is ours: only the decompressor's own call is guarded, so
an OSError reading a spill file, `WorkDirFailed` or `LimitExceeded` pass on.
"""

from __future__ import annotations

import bz2
import lzma
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from amavisd.decode import external
from amavisd.decode.decompressors import (  # noqa: F401  (LZ4_*: the tests' vocabulary)
    CHUNK,
    CORRUPT,
    LZ4_FRAME,
    LZ4_LEGACY,
    LZMA_MEMLIMIT,
    CutShort,
    GzipMember,
    Lz4Frame,
    LzipMember,
    LzwDecompressor,
    is_skippable,
)
from amavisd.decode.limits import LimitExceeded
from amavisd.decode.parts import Part, clip_name
from amavisd.decode.registry import Context, DecodeError, Undecipherable, register

try:  # Python >= 3.14
    from compression.zstd import ZstdDecompressor
except ImportError:  # pragma: no cover - depends on the Python version
    from backports.zstd import ZstdDecompressor

LZW_TOOL_FROM = 64 * 1024  # compressed size from which gzip(1) beats our LZW (figures above)
HEAD = 8  # bytes of a member kept to tell another member from trailing data
# Where a member of each multi-member format starts: looked for in trailing
# data, where it means a member some reader may find (one that skips garbage)
# and we did not read.
SIGNATURES: dict[str, re.Pattern[bytes]] = {
    "gzip": re.compile(rb"\x1f\x8b\x08[\x00-\x1f]"),  # magic, deflate, no reserved flag
    "bzip2": re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)"),  # a block, or the end
    "xz": re.compile(rb"\xfd7zXZ\x00"),
    "lzip": re.compile(rb"LZIP[\x00\x01]"),
    "zstd": re.compile(rb"\x28\xb5\x2f\xfd"),
    "lz4": re.compile(re.escape(LZ4_FRAME) + b"|" + re.escape(LZ4_LEGACY)),
}
SIGNATURE_MAX = 16  # no signature above is longer: chunks overlap by this much


class StreamCorrupt(Exception):
    """The decompressor gave up on the data; the message says where."""


def stream(part: Part, ctx: Context, new_decompressor: Callable[[], object], name: str,
           multi_member: bool = True, is_member: Callable[[bytes], bool] | None = None) -> None:
    """Decompress `part` into one child named `name`; with `multi_member`,
    concatenated members (gzip, lzip, zstd and lz4 frames) continue it.
    Zero padding between or after members is skipped; other bytes after
    the end are reported (the part is flagged; Undecipherable when a member
    signature is among them), as is a member cut short or corrupt. `is_member`
    says whether the bytes after a member start another one: if not, they
    are trailing data, not a corrupt member."""
    sink = ctx.sink(part, name=name)
    run = _Run(new_decompressor, multi_member, sink.write, is_member or (lambda head: True))
    part.flags.add("expanded")
    try:
        for chunk in part.chunks():
            run.feed(chunk)
            ctx.budget.check_time()
        run.end_of_input()
    except LimitExceeded:
        sink.finish(truncated=True)
        raise
    except StreamCorrupt as err:
        salvage(part, ctx, sink.finish(truncated=True), f"{part.detected} stream corrupt: {err}")
    child = sink.finish(truncated=not run.complete)
    if "truncated" in child.flags:
        part.flags.add("truncated")
    problems = []
    if run.checks_failed:
        child.flags.add("corrupt")
        problems.append("; ".join(run.checks_failed[:3]) + " (the data is kept and scanned)")
    if run.trailing:
        problems.append("data after the end of the stream")
        hidden = _signature_after(part, ctx, run.trailing_from)
        if hidden >= 0:  # a member there that no reading here reaches
            problems.append(f"a {part.detected} member starts in it at offset {hidden}, "
                            "not read")
            raise Undecipherable("; ".join(problems))  # the engine names the format
    if problems:
        raise DecodeError(f"{part.detected}: {'; '.join(problems)}")


def _signature_after(part: Part, ctx: Context, start: int) -> int:
    """The offset of the first member signature at or after `start` in the
    part (SIGNATURES), or -1."""
    signature = SIGNATURES.get(part.detected)
    if signature is None or start < 0:
        return -1
    with part.open() as fh:
        fh.seek(start)
        pos, tail = start, b""
        while chunk := fh.read(CHUNK):
            window = tail + chunk
            found = signature.search(window)
            if found:
                return pos - len(tail) + found.start()
            tail = window[-SIGNATURE_MAX:]
            pos += len(chunk)
            ctx.budget.check_time()
    return -1


class _Run:
    """One pass over a stream of members, fed chunk by chunk."""

    def __init__(self, new_decompressor: Callable[[], object], multi_member: bool,
                 write: Callable[[bytes], None], is_member: Callable[[bytes], bool]):
        self.new_decompressor = new_decompressor
        self.multi_member = multi_member
        self.write = write
        self.is_member = is_member
        self.decompressor = new_decompressor()
        self.members = 0  # members complete
        self.member_output = 0  # bytes from the member under way
        self.member_fed = False  # the member under way has had input
        self.member_head = b""  # its first bytes
        self.over = False  # the stream ended; what follows is trailing data
        self.trailing = False
        self.cut_short = False
        self.fed = 0  # input bytes so far
        self.member_start = 0  # offset of the member under way (after zero padding)
        self.between = False  # after a member: zero padding is skipped, then the next one
        self.trailing_from = -1  # offset of the trailing data, once there is some
        self.checks_failed: list[str] = []  # members whose data decoded but failed the check

    @property
    def complete(self) -> bool:
        return not self.cut_short and (
            self.over or (self.members > 0 and not self.member_fed))

    def feed(self, data: bytes) -> None:
        self.fed += len(data)
        if self.over:
            self.trailing = self.trailing or bool(data.strip(b"\0"))
            return
        if self.between:  # zero padding, however long: no member starts with a zero
            stripped = data.lstrip(b"\0")
            self.member_start += len(data) - len(stripped)
            if not stripped:
                return
            self.between, data = False, stripped
        decompressor = self.decompressor
        while True:
            self.member_fed = self.member_fed or bool(data)
            if len(self.member_head) < HEAD:
                self.member_head += data[:HEAD - len(self.member_head)]
            out = self._decompress(data)
            if out is None:
                return
            self.member_output += len(out)
            self.write(out)
            # zlib keeps input it had no room for; the others keep output instead.
            # (At the end CPython's zlib may leave a stale tail: unused_data has it.)
            data = b"" if decompressor.eof else getattr(decompressor, "unconsumed_tail", b"")
            if decompressor.eof:
                self.members += 1
                failed = getattr(decompressor, "check_failed", "")
                if failed:
                    self.checks_failed.append(f"member {self.members}: {failed}")
                rest = decompressor.unused_data + data
                end = self.fed - len(rest)  # where this member ended
                if not self.multi_member:
                    self.over = True
                    self.trailing = bool(rest.strip(b"\0"))
                    self.trailing_from = end
                    return
                # Zero padding, then another member: Python's gzip module reads on
                # past the zeros (gzip(1) stops), so that is a reading too.
                decompressor = self.decompressor = self.new_decompressor()  # the next member
                self.member_output, self.member_fed, self.member_head = 0, False, b""
                data = rest.lstrip(b"\0")
                self.member_start = end + len(rest) - len(data)
                if not data:
                    self.between = True
                    return
                continue
            if data or not getattr(decompressor, "needs_input", True):  # zlib has none
                continue
            return

    def _decompress(self, data: bytes) -> bytes | None:
        """The decompressor's output, or None when the stream ends here: cut
        short, or bytes after a member that do not start another one."""
        try:
            return self.decompressor.decompress(data, CHUNK)
        except CutShort:
            self.cut_short = self.over = True
            return None
        except CORRUPT as err:
            if self.members and not self.member_output and not self.is_member(self.member_head):
                self.over = self.trailing = True
                self.trailing_from = self.member_start
                return None
            raise StreamCorrupt(f"member {self.members + 1}: {err}") from None

    def end_of_input(self) -> None:
        """Formats with no end marker (compress, lz4 legacy) end here."""
        if not self.over and self.member_fed and hasattr(self.decompressor, "end_of_input"):
            self.decompressor.end_of_input()
            self.feed(b"")


@dataclass(frozen=True)
class Salvager:
    """A second reading of a damaged stream by its own tool, to stdout."""

    tool: str
    argv: Callable[[str], list[str]]  # input path -> argv
    read_all: Callable[[object], bool]  # given its ToolResult: it read to the end


def _exit_0(result) -> bool:
    return result.returncode == 0


def _gzip_read_all(result) -> bool:
    return result.returncode in (0, 2)  # 2: a warning (trailing garbage ignored)


def _7zz_read_all(result) -> bool:
    """7-Zip writes the data, then says "CRC Failed": only the check failed."""
    errors = [line for line in result.text.splitlines() if line.startswith("ERROR:")]
    return result.returncode == 0 or (
        result.returncode == 2 and bool(errors) and all("CRC Failed" in e for e in errors))


def _lz4_read_all(result) -> bool:
    return result.returncode == 0 or "ERROR_contentChecksum_invalid" in result.text


SALVAGERS: dict[str, Salvager] = {
    "gzip": Salvager("gzip", lambda src: ["gzip", "-dcq", "--", src], _gzip_read_all),
    "compress": Salvager("gzip", lambda src: ["gzip", "-dcq", "--", src], _gzip_read_all),
    # bzip2(1) drops the block whose CRC fails; 7-Zip writes it
    "bzip2": Salvager("7zz", lambda src: ["7zz", "e", "-so", "-tbzip2", "-bd", "--", src],
                      _7zz_read_all),
    "xz": Salvager("xz", lambda src: ["xz", "-dcq", "--ignore-check", "--", src], _exit_0),
    "lzma": Salvager("xz", lambda src: ["xz", "-dcq", "--format=lzma", "--", src], _exit_0),
    "lzip": Salvager("lzip", lambda src: ["lzip", "-dcq", "--", src], _exit_0),
    "zstd": Salvager("zstd", lambda src: ["zstd", "-dcq", "--no-check", "--", src], _exit_0),
    "lz4": Salvager("lz4", lambda src: ["lz4", "-dcq", src], _lz4_read_all),  # lz4 takes no --
}


def salvage(part: Part, ctx: Context, child: Part, why: str) -> None:
    """After an in-process failure: the stream read again by its tool; its
    output is a second child when it holds more than `child`. Raises
    DecodeError when the tool read to the end (only a check failed), else
    Undecipherable: content is left that nothing here could produce."""
    salvager = SALVAGERS.get(part.detected)
    if salvager is None or not external.available(salvager.tool):
        raise Undecipherable(f"{why}; what precedes the damage is scanned")
    work = ctx.scratch_dir(part)
    try:
        source = external.input_path(ctx, part, work, "input")
        out = os.path.join(work, "out")
        os.mkdir(out, 0o700)
        path = os.path.join(out, "stream")
        result = external.run_tool(ctx, salvager.argv(source), cwd=work, watch=out, stdout=path)
        read_all = salvager.read_all(result)
        if os.path.getsize(path) > child.size:
            child = _keep_output(part, ctx, path, child.name, truncated=not read_all, flag=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if read_all:
        child.flags.discard("truncated")  # ours, or the tool's: it holds the whole stream
        child.flags.add("corrupt")
        raise DecodeError(f"{why}; {salvager.tool} read it to the end, only a check failed")
    raise Undecipherable(f"{why}; neither we nor {salvager.tool} read past the damage, "
                         "what precedes it is scanned")


def inner_name(part: Part, suffixes: tuple[str, ...]) -> str:
    """The name a compressed part's content had: `part.name` less its suffix
    (a name that is only the suffix is kept, not emptied)."""
    name = part.name
    for suffix in suffixes:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@register("gzip")
def decode_gzip(part: Part, ctx: Context) -> None:
    name = _gzip_name(part.head(1024)) or inner_name(part, (".gz", ".tgz", ".z"))
    stream(part, ctx, GzipMember, name, is_member=lambda head: head[:2] == b"\x1f\x8b")


@register("bzip2")
def decode_bzip2(part: Part, ctx: Context) -> None:
    stream(part, ctx, bz2.BZ2Decompressor, inner_name(part, (".bz2", ".tbz")),
           is_member=lambda head: head[:3] == b"BZh")


@register("xz")
def decode_xz(part: Part, ctx: Context) -> None:
    # an xz block header may ask for any dictionary too: liblzma refuses past memlimit
    stream(part, ctx, lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT),
           inner_name(part, (".xz", ".txz")),
           is_member=lambda head: head[:6] == b"\xfd7zXZ\x00")


@register("lzma")
def decode_lzma_alone(part: Part, ctx: Context) -> None:
    stream(part, ctx, lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=LZMA_MEMLIMIT),
           inner_name(part, (".lzma", ".tlz")), multi_member=False)


@register("lzip")
def decode_lzip(part: Part, ctx: Context) -> None:
    stream(part, ctx, LzipMember, inner_name(part, (".lz", ".tlz")),
           is_member=lambda head: head[:4] == b"LZIP")


@register("zstd")
def decode_zstd(part: Part, ctx: Context) -> None:
    stream(part, ctx, ZstdDecompressor, inner_name(part, (".zst", ".zstd", ".tzst")),
           is_member=lambda head: head[:4] == b"\x28\xb5\x2f\xfd" or is_skippable(head[:4]))


@register("lz4")
def decode_lz4(part: Part, ctx: Context) -> None:
    stream(part, ctx, Lz4Frame, inner_name(part, (".lz4",)),
           is_member=lambda head: head[:4] in (LZ4_FRAME, LZ4_LEGACY) or is_skippable(head[:4]))


@register("compress")
def decode_compress(part: Part, ctx: Context) -> None:
    name = inner_name(part, (".z",))
    if part.size >= LZW_TOOL_FROM and external.available("gzip") and \
            _uncompress_with_gzip(part, ctx, name):
        return
    stream(part, ctx, LzwDecompressor, name, multi_member=False)


def _uncompress_with_gzip(part: Part, ctx: Context, name: str) -> bool:
    """A big .Z through gzip(1), boxed: copied into a scratch dir, decoded in
    place there (its output watched against the allowance), then read back.
    False when gzip finds the stream corrupt: it then deletes its output, so
    the caller decodes in-process, which keeps what precedes the damage."""
    work = ctx.scratch_dir(part)
    packed, unpacked = os.path.join(work, "x.Z"), os.path.join(work, "x")
    part.write_to(packed)
    try:
        result = external.run_tool(ctx, ["gzip", "-d", "-f", "-q", packed], cwd=work,
                                   watch=work)
    except LimitExceeded:
        _keep_output(part, ctx, unpacked, name, truncated=True)
        raise
    if result.returncode == 1:  # corrupt (2 is a warning: trailing garbage ignored)
        return False
    _keep_output(part, ctx, unpacked, name, truncated=False)
    return True


def _keep_output(part: Part, ctx: Context, path: str, name: str, truncated: bool,
                 flag: bool = True) -> Part:
    """What a tool wrote at `path` becomes a child of the part, charged;
    with `flag`, a truncated child flags the part truncated too."""
    sink = ctx.sink(part, name=name)
    part.flags.add("expanded")
    try:
        if os.path.lexists(path):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    sink.write(chunk)
            os.unlink(path)
    except LimitExceeded:
        sink.finish(truncated=True)
        raise
    child = sink.finish(truncated=truncated)
    if truncated and flag:
        part.flags.add("truncated")
    return child


def _gzip_name(head: bytes) -> str:
    """The FNAME field of a gzip header, if any (RFC 1952)."""
    if len(head) < 10 or not head[3] & 0x08:
        return ""
    pos = 10
    if head[3] & 0x04:  # FEXTRA
        if len(head) < 12:
            return ""
        pos += 2 + int.from_bytes(head[10:12], "little")
    end = head.find(b"\0", pos)
    if end < 0:
        return ""
    return clip_name(head[pos:end].decode("latin-1").translate({c: None for c in range(32)}),
                     255)
