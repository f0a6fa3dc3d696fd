"""ARJ, LHA/LZH, ZOO and ARC: old archivers, read by external tools.

No well-kept Python reader exists for these formats, so a real unpacker runs
boxed (`external.run_tool`) into a private scratch dir and `members.harvest`
turns what it wrote into parts, never following a link. `UNPACKERS` says which
tool reads which format, in order of preference; the next one runs only when the
one before failed (lhasa cannot read -lh2-/-lh3-, unar can read -lh2-).

Chosen by measurement (hyperfine, the tool alone, mean ms per archive; small =
a corpus sample under 40 KB, big = a 1.1 MiB archive of 10 members made by the
real archiver). Through run_tool every run takes at least ~23 ms, its 20 ms poll:
- ARJ: 7zz 4.7 / 13.8, arj 4.2 / 23.4, unar 53.8 / 76.1. 7zz, also because
  `-aou` keeps same-named members apart where arj -y overwrites one with the next;
  arj second, for when 7zz is missing or fails.
- LHA: lhasa 4.1 / 32.0, 7zz 6.5 / 18.7, unar 53.0 / 66.9. lhasa: 7zz fails on
  -lh1-, header level 3, .lzs and .pma; unar fails on level 3. lhasa reads the
  whole corpus but -lh2-, -lh3- and LHark's -lh7-; unar second, for -lh2-.
- ARC: nomarch 1.2 / 33.8, arc 1.5 / 18.3, unar 24.6 / crashes (SIGSEGV on
  crunched members, now and then). nomarch: arc stops at the first hostile name
  ("illegal filename", exit 0, later members never written) and reports no
  CRC error; nomarch sanitises names and says "bad CRC" per member.
- ZOO: unar 30.6, the only reader on Debian 12.

Encryption: ARJ says so in each member's header (the "garbled" flag), read here
before the tool runs. ARC cannot say it: a garbled member only fails its CRC,
so a bad CRC is reported as "encrypted or corrupt" and makes the message
UNCHECKED, never CLEAN. LHA and ZOO have no encryption.

Fail closed, and scan every reading: what a failing unpacker wrote is kept
(and scanned) before the next one runs; when none exits 0, or none is
installed, some content could not be produced: `Undecipherable`, UNCHECKED
with all that was read scanned (unless encrypted members explain it, which
are UNCHECKED already).

Same names: an unpacker that exits 0 may have written a member over an
earlier one of the same name (nomarch, lhasa and arj do). That is noticed by
counting (the ARJ headers, or the tool's own report of what it wrote against
the files harvested), and then readers that keep such members apart read
the archive again (`APART`: 7zz -aou for ARJ and LHA; nomarch on a copy whose
ARC headers got distinct names, ARC headers having no checksum). When none
gives every member: `Undecipherable`.

Never: run a tool outside `ctx.scratch_dir`, trust its exit code alone for
"everything was read", or use a member name as a path (`harvest` names parts
from what is on disk, cleaned).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from amavisd.decode import external
from amavisd.decode.archives import members
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, Undecipherable, register

log = logging.getLogger("amavisd.decode.legacy")


@dataclass(frozen=True)
class Unpacker:
    """One tool's way to extract a whole archive into `outdir`."""

    tool: str
    argv: Callable[[str, str], list[str]]  # (archive path, output dir) -> argv
    written: re.Pattern[bytes] | None = None  # one match in its output per member it wrote
    unverified: re.Pattern[bytes] | None = None  # group "name": data failed its CRC
    # it wrote every member (at worst a CRC failed on data it kept): no next reader
    read_all: Callable[[external.ToolResult], bool] = lambda result: result.returncode == 0
    # (archive path, scratch dir) -> the file the tool reads instead, prepared there
    prepare: Callable[[str, str], str] | None = None


def _7zz_read_all(result: external.ToolResult) -> bool:
    """7-Zip keeps a member whose CRC failed (arj deletes it): only checks failed."""
    report = external.SevenZipReport.read(result, "")
    return result.returncode == 0 or not (report.failed or report.wrong_password)


SEVEN_ZIP_ARJ = Unpacker(
    "7zz", lambda src, out: ["7zz", "x", "-tarj", "-y", "-aou", "-bd", "-bb1", "-o" + out,
                             "--", src],  # members counted from the ARJ headers
    read_all=_7zz_read_all)
ARJ = Unpacker("arj", lambda src, out: ["arj", "x", "-y", src, out + "/"])
LHASA = Unpacker(
    "lhasa", lambda src, out: ["lhasa", "xfw=" + out, src],
    written=re.compile(rb"\t- Melted"))
UNAR = Unpacker(
    "unar", lambda src, out: ["unar", "-D", "-nr", "-r", "-k", "skip", "-o", out, "--", src],
    written=re.compile(rb"\(\d+ B\)\.\.\. OK\.$", re.M))
NOMARCH = Unpacker(
    # nomarch writes into its cwd and has no option for another dir; env -C puts it
    # in `out`, while run_tool's own logs stay in the scratch dir: a member named
    # ".stdout" must not land on them.
    "nomarch", lambda src, out: ["env", "-C", out, "nomarch", src],
    written=re.compile(rb"\t(ok|warning, bad CRC)$", re.M),
    unverified=re.compile(rb"^(?P<name>.*?) *\t\w+, bad CRC$", re.M),
)

SEVEN_ZIP_LHA = Unpacker(
    "7zz", lambda src, out: ["7zz", "x", "-tlzh", "-y", "-aou", "-bd", "-o" + out, "--", src],
    read_all=_7zz_read_all)


def _arc_distinct_names(source: str, work: str) -> str:
    """A copy of an ARC whose members all have distinct names, so nomarch
    writes each to a file of its own: a later "E.TXT" becomes "1~E.TXT".
    ARC headers (0x1A, method, 13-byte name, sizes, CRC of the data) carry
    no checksum of their own; the walk stops at anything else."""
    copy = os.path.join(work, "distinct.arc")
    shutil.copyfile(source, copy)
    seen: set[bytes] = set()
    with open(copy, "r+b") as fh:
        pos = 0
        for _ in range(100_000):
            fh.seek(pos)
            head = fh.read(29)
            if len(head) < 19 or head[0] != 0x1A or not 0 < head[1] < ARC_LAST_METHOD:
                break
            name = head[2:15].split(b"\0", 1)[0]
            new = name
            for n in range(1, 10_000):
                if new.upper() not in seen:
                    break
                new = (b"%d~" % n + name)[:12]
            if new != name:
                fh.seek(pos + 2)
                fh.write(new.ljust(13, b"\0"))
            seen.add(new.upper())
            (packed,) = struct.unpack_from("<I", head, 15)
            pos += (25 if head[1] == 1 else 29) + packed
    return copy


ARC_LAST_METHOD = 20  # 1-19: the methods of ARC and its kin; 0 ends the archive
NOMARCH_APART = Unpacker(NOMARCH.tool, NOMARCH.argv, NOMARCH.written, NOMARCH.unverified,
                         prepare=_arc_distinct_names)

# detected type -> (input file suffix, unpackers in order of preference)
UNPACKERS: dict[str, tuple[str, tuple[Unpacker, ...]]] = {
    "arj": ("arj", (SEVEN_ZIP_ARJ, ARJ)),
    "lha": ("lzh", (LHASA, UNAR)),
    "zoo": ("zoo", (UNAR,)),
    "arc": ("arc", (NOMARCH,)),
}
# detected type -> readers that keep members of one name apart, for when the
# reading wrote fewer files than there are members
APART: dict[str, tuple[Unpacker, ...]] = {
    "arj": (SEVEN_ZIP_ARJ,),
    "lha": (SEVEN_ZIP_LHA,),
    "arc": (NOMARCH_APART,),
}


@register(*UNPACKERS)
def decode_legacy(part: Part, ctx: Context) -> None:
    suffix, unpackers = UNPACKERS[part.detected]
    inventory = INVENTORIES.get(part.detected, lambda p: Inventory())(part)
    for name in inventory.encrypted:
        part.flags.add("encrypted")
        ctx.note_unchecked(part, f"encrypted {part.detected} member {members.clean_name(name)}",
                           kind="encrypted")
    runnable = [u for u in unpackers if external.available(u.tool)]
    if not runnable:
        tried = ", ".join(u.tool for u in unpackers) or "none exists on this system"
        raise Undecipherable(f"no {part.detected} unpacker installed ({tried})")
    work = ctx.scratch_dir(part)
    try:  # the scratch dir goes at once, even when a limit stops the tool
        source = external.input_path(ctx, part, work, "input." + suffix)
        readings = _extract(ctx, part, work, source, runnable)
        first_readings = len(readings)
        overwritten = _overwritten(ctx, part, work, source, readings, inventory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    unverified = {name: None for r in readings  # once each, though two readings say it
                  for name in _unverified(r.unpacker, r.result.stdout + r.result.stderr)}
    for name in unverified:
        part.flags.add("encrypted")
        ctx.note_unchecked(part, f"encrypted or corrupt {part.detected} member {name}",
                           kind="encrypted")
    first = readings[:first_readings]  # then, those that kept members of one name apart
    failures = [f"{r.unpacker.tool} exit {r.result.returncode}: {_last_line(r.result, work)}"
                for r in first if r.result.returncode]
    good = first[-1] if first[-1].unpacker.read_all(first[-1].result) else None
    if good is None:
        if "encrypted" in part.flags:  # the encrypted members explain it: UNCHECKED already
            return
        raise Undecipherable("; ".join(failures))
    if len(first) > 1:  # a reader that cannot do this (lhasa and -lh2-): the next one did
        log.debug("%s: %s; %s read it", part.path, "; ".join(failures), good.unpacker.tool)
    if overwritten:
        raise Undecipherable(overwritten)
    if "encrypted" not in part.flags and len(readings) == first_readings:
        part.flags.add("expanded")  # (after members of one name, the archive is scanned too)
    if good.result.returncode:  # it kept members whose CRC failed: scanned as they are
        raise DecodeError(f"{good.unpacker.tool} exit {good.result.returncode}: "
                          f"{_last_line(good.result, work)}")


@dataclass
class Reading:
    unpacker: Unpacker
    result: external.ToolResult
    parts: int  # the files its harvest added (links apart: no tool counts them as written)

    def written(self) -> int | None:
        """How many members the tool says it wrote, where it says so."""
        if self.unpacker.written is None:
            return None
        return len(self.unpacker.written.findall(self.result.stdout + self.result.stderr))


def _extract(ctx: Context, part: Part, work: str, source: str, unpackers: list[Unpacker]
             ) -> list[Reading]:
    """Run the unpackers in turn until one exits 0, each into its own dir,
    each harvested: what a failing one wrote is scanned too, since another
    reader may not give it (a member it read before its failure)."""
    readings = []
    for unpacker in unpackers:
        readings.append(_read(ctx, part, work, source, unpacker))
        if unpacker.read_all(readings[-1].result):
            break
    return readings


def _read(ctx: Context, part: Part, work: str, source: str, unpacker: Unpacker) -> Reading:
    """One unpacker into a dir of its own, harvested."""
    outdir = tempfile.mkdtemp(prefix="out", dir=work)
    if unpacker.prepare is not None:
        source = unpacker.prepare(source, work)
    result = external.run_tool(ctx, unpacker.argv(source, outdir), cwd=work, watch=outdir)
    before = len(part.children)
    skipped = members.harvest(ctx, part, outdir)
    if skipped:
        log.debug("%s: devices and the like not read: %s", part.path, ", ".join(skipped[:10]))
    shutil.rmtree(outdir, ignore_errors=True)
    files = sum(1 for child in part.children[before:] if "link" not in child.flags)
    return Reading(unpacker, result, files)


def _overwritten(ctx: Context, part: Part, work: str, source: str, readings: list[Reading],
                 inventory: Inventory) -> str:
    """When the reading that read all wrote fewer files than there are
    members (one written over by a later one of the same name), readers that
    keep them apart read the archive again (`APART`), each harvested, until
    one gives them all. What is wrong ("" when nothing is)."""
    good = readings[-1]
    if not good.unpacker.read_all(good.result):
        return ""
    expected = inventory.files if inventory.files is not None else good.written()
    if expected is None or good.parts >= expected:
        return ""
    problem = f"{expected} members, {good.unpacker.tool} wrote {good.parts} files " \
        "(members of one name?)"
    for unpacker in APART.get(part.detected, ()):
        if unpacker == good.unpacker or not external.available(unpacker.tool):
            continue
        reading = _read(ctx, part, work, source, unpacker)
        readings.append(reading)
        if reading.parts >= expected:  # every member apart (what it said after: scanned)
            log.info("%s: %s; %s kept them apart", part.path, problem, unpacker.tool)
            return ""
        problem += f"; {unpacker.tool} wrote {reading.parts}" + (
            f" (exit {reading.result.returncode}: {_last_line(reading.result, work)})"
            if reading.result.returncode else "")
    return problem + "; no reader here kept them apart"


def _unverified(unpacker: Unpacker, output: bytes) -> list[str]:
    if unpacker.unverified is None:
        return []
    return [members.clean_name(m.group("name")) for m in unpacker.unverified.finditer(output)]


def _last_line(result: external.ToolResult, work: str) -> str:
    text = result.text.replace(work.rstrip("/") + "/", "").replace("\r", "\n")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


# -- ARJ headers: the garbled (password) flag, and header checks for sfx ----------

ARJ_ID = b"\x60\xea"
ARJ_MAX_HEADER = 2600
ARJ_GARBLED = 0x01
ARJ_MAIN = 2  # file type of the archive's main header
ARJ_FILE_TYPES = (0, 1)  # binary, 7-bit text (3 = directory, 4 = volume label)


@dataclass(frozen=True)
class ArjHeader:
    flags: int
    file_type: int
    compressed: int
    name: bytes
    end: int  # offset just after the header and its extended headers


def read_arj_header(buf, pos: int) -> ArjHeader | None:
    """The ARJ header at `pos` in `buf` (bytes, mmap, or a seekable file), or
    None when there is none: wrong id, odd size or a bad CRC-32. An end-of-archive
    marker (size 0) is returned with file_type -1."""
    head = _read_at(buf, pos, 4)
    if len(head) < 4 or head[:2] != ARJ_ID:
        return None
    (size,) = struct.unpack_from("<H", head, 2)
    if size == 0:
        return ArjHeader(0, -1, 0, b"", pos + 4)
    if size < 30 or size > ARJ_MAX_HEADER:
        return None
    body = _read_at(buf, pos + 4, size + 4)
    if len(body) < size + 4 or zlib.crc32(body[:size]) != struct.unpack_from("<I", body, size)[0]:
        return None
    first = body[0]
    if first < 30 or first > size:
        return None
    end = pos + 4 + size + 4
    for _ in range(64):  # extended headers: size, bytes, CRC-32; size 0 ends them
        raw = _read_at(buf, end, 2)
        if len(raw) < 2:
            return None
        (extra,) = struct.unpack_from("<H", raw)
        end += 2
        if extra == 0:
            break
        end += extra + 4
    (compressed,) = struct.unpack_from("<I", body, 12)
    name = body[first:size].split(b"\0", 1)[0]
    return ArjHeader(body[4], body[6], compressed, name, end)


@dataclass
class Inventory:
    """What a format's own headers tell before any tool runs."""

    encrypted: list[bytes] = field(default_factory=list)  # member names
    files: int | None = None  # regular members a tool must write (None: unknown)


def arj_inventory(part: Part) -> Inventory:
    """Walk the ARJ headers: the members with the garbled flag, and how many
    plain file members there are (directories and labels are not files)."""
    inventory = Inventory()
    with part.open() as fh:
        main = read_arj_header(fh, 0)
        if main is None or main.file_type != ARJ_MAIN:
            return inventory
        inventory.files = 0
        pos = main.end
        for _ in range(100_000):
            header = read_arj_header(fh, pos)
            if header is None or header.file_type == -1:
                break
            if header.file_type in ARJ_FILE_TYPES:
                if header.flags & ARJ_GARBLED:
                    inventory.encrypted.append(header.name)
                else:
                    inventory.files += 1
            pos = header.end + header.compressed
    return inventory


INVENTORIES: dict[str, Callable[[Part], Inventory]] = {"arj": arj_inventory}


def _read_at(buf, pos: int, size: int) -> bytes:
    if hasattr(buf, "seek"):
        buf.seek(pos)
        return buf.read(size)
    return bytes(buf[pos:pos + size])
