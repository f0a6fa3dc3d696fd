"""RAR 1.5-4 and RAR5: rarfile reads the listing in-process, unar extracts, boxed.

Measured on the corpus (archives/rar, 37 samples, per archive):
- listing: rarfile 0.05-0.3 ms, `lsar -j` 21-36 ms. rarfile's listing gives
  names, per-member encryption, header encryption, links and volume splits,
  so lsar is never run;
- extraction: `unar` 21-38 ms (a whole decode through run_tool: median 45 ms,
  27 ms with run_tool waiting on the process instead of 20 ms sleeps);
  bsdtar 4-6 ms but not correct: RAR 2.0
  (clam-v2.rar) came out corrupt, RAR3 solid archives are refused, and a RAR5
  holding a zip (rar5_zip_in_rar) was read as that zip. rarfile cannot
  decompress by itself: it runs unrar/unar per member, outside our box. So one
  unar run extracts every member, and is skipped when the listing shows
  there is nothing it could open (encrypted headers, only encrypted members);
  a listing that shows nothing at all is not trusted: unar looks too.
unar leaves an empty file for a member it could not decrypt; those become
the encrypted members' named placeholders.

When unar fails on a member that is not encrypted (a solid RAR5 it reads
short, a member path through a link entry), bsdtar reads the archive again
(libarchive, another decoder) into its own dir, flat: every "/" in a name
made "_", so no path meets a link; what it writes is scanned too. If bsdtar reads it all, the archive is decode-error; if neither
did, some member could not be produced: `Undecipherable`, UNCHECKED with
all that was read scanned. A piece of a multi-volume set is only flagged
truncated: its members continue in pieces that are not here.

unar exits 0 having written a member over an earlier one of the same name
(-force-rename only renames around files that were there before it ran),
and so does bsdtar; Debian's 7zz has no rar. So when unar wrote fewer
files than the listing has members, no reader here gives them all:
`Undecipherable`.

Never: follow or create-then-follow a link (harvest reads what unar made;
the corpus' rar5-evil-symlink-traversal is in the tests), use a member name as
a path, or wait for a password (unar gets a dummy one; stdin is /dev/null).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import rarfile

from amavisd.decode import external
from amavisd.decode.archives import members
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, Undecipherable, register

DUMMY_PASSWORD = "amavisd-no-password"
SPLIT = rarfile.RAR_FILE_SPLIT_BEFORE | rarfile.RAR_FILE_SPLIT_AFTER
RAR3_MARK = b"Rar!\x1a\x07\x00"
RAR5_MARK = b"Rar!\x1a\x07\x01\x00"


@dataclass
class Listing:
    plain: list[str] = field(default_factory=list)  # files unar can extract
    locked: list[str] = field(default_factory=list)  # encrypted files
    split: list[str] = field(default_factory=list)  # files continued in another volume
    headers_encrypted: bool = False
    volume: bool = False  # one piece of a multi-volume set


@register("rar")
def decode_rar(part: Part, ctx: Context) -> None:
    listing = read_listing(part)
    if listing is not None and listing.headers_encrypted:
        _mark_encrypted(part, ctx, [], "encrypted rar headers")
        return
    locked = listing.locked if listing else []
    problem, refused, written = "", False, 0
    if listing is None or listing.plain or listing.split or not listing.locked:
        problem, refused, written = _extract(part, ctx, len(locked))
    if locked or refused:  # refused: unar met a password rarfile's listing did not show
        _mark_encrypted(part, ctx, locked, "encrypted rar member")
    piece = listing is not None and bool(listing.split or listing.volume)
    if piece:
        part.flags.add("truncated")  # the other volumes are not here
    tool = "unar"
    if problem and not piece:
        second, written = _extract_with_bsdtar(part, ctx)
        if second:
            raise Undecipherable(f"{problem}; {second}")
        problem, tool = f"{problem}; bsdtar read it all", "bsdtar"
    if listing is not None and not piece and written < len(listing.plain):
        raise Undecipherable(f"{len(listing.plain)} members, {tool} wrote {written} files "
                             "(members of one name?); no reader here keeps them apart")
    if problem:
        raise DecodeError(problem)
    if not (part.flags & {"encrypted", "truncated"}):
        part.flags.add("expanded")


def read_listing(part: Part) -> Listing | None:
    """The members as rarfile reads the headers; None when it cannot."""
    try:
        source = part.spill_path or io.BytesIO(part.data)
        with rarfile.RarFile(source, part_only=True) as archive:
            infos = archive.infolist()
            listing = Listing(headers_encrypted=archive.needs_password() and not infos,
                              volume=is_volume(part.head(64)))
    except Exception as err:  # rarfile.Error and whatever a hostile header provokes
        if members.is_ours(err):
            raise
        return None
    for info in infos:
        if info.is_dir() or info.is_symlink() or info.file_redir:
            continue  # links carry a path, never content; copies repeat a member
        if info.flags & SPLIT:
            listing.split.append(info.filename)
        elif info.needs_password():
            listing.locked.append(info.filename)
        else:
            listing.plain.append(info.filename)
    return listing


def is_volume(head: bytes) -> bool:
    """The main header's volume flag (RAR3 MHD_VOLUME, RAR5 archive flag 1).
    rarfile hides a member continued from an earlier volume, so a middle
    volume lists nothing: this flag is what says it is not simply empty."""
    if head.startswith(RAR3_MARK):
        main = head[len(RAR3_MARK):]  # CRC16, type 0x73, flags
        return main[2:3] == b"\x73" and bool(int.from_bytes(main[3:5], "little") & 1)
    if not head.startswith(RAR5_MARK):
        return False
    pos = len(RAR5_MARK) + 4  # after the header CRC32
    _, pos = _vint(head, pos)  # header size
    kind, pos = _vint(head, pos)
    flags, pos = _vint(head, pos)
    if kind != 1:  # not the main archive header
        return False
    for present in (flags & 1, flags & 2):  # extra area size, data size
        if present:
            _, pos = _vint(head, pos)
    archive_flags, _ = _vint(head, pos)
    return bool(archive_flags & 1)


def _vint(data: bytes, pos: int) -> tuple[int, int]:
    """A RAR5 variable-length integer: 7 bits a byte, high bit = more follows."""
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value, pos


def _extract(part: Part, ctx: Context, locked: int) -> tuple[str, bool, int]:
    """Run unar once; return what went wrong ("" when all is well), whether
    it asked for a password, and how many files (not links) it wrote."""
    if not external.available("unar"):
        return "rar needs unar, which is not installed", False, 0
    work = ctx.scratch_dir(part)
    source = external.input_path(ctx, part, work, "input.rar")
    out = os.path.join(work, "out")
    os.mkdir(out, 0o700)
    argv = ["unar", "-q", "-no-recursion", "-no-directory", "-force-rename",
            "-password", DUMMY_PASSWORD, "-output-directory", out, source]
    result = external.run_tool(ctx, argv, cwd=work, watch=out)
    before = len(part.children)
    members.harvest(ctx, part, out)
    written = sum(1 for child in part.children[before:] if "link" not in child.flags)
    text = result.text
    failed = text.count("Failed!")
    refused = "wrong password" in text
    if "parsing failed" in text or failed > locked or (result.returncode and not failed):
        return f"unar exit {result.returncode}: {result.said(work)}", refused, written
    return "", refused, written


def _extract_with_bsdtar(part: Part, ctx: Context) -> tuple[str, int]:
    """The second reading, by libarchive; what went wrong ("" when all is
    well), and how many files (not links) it wrote."""
    if not external.available("bsdtar"):
        return "bsdtar, the second reader, is not installed", 0
    work = ctx.scratch_dir(part)
    source = external.input_path(ctx, part, work, "input.rar")
    out = os.path.join(work, "out-bsdtar")
    os.mkdir(out, 0o700)
    # flat (every "/" made "_"): no member path can meet a link or a name
    # another member made a file, the failures that stop unar on hostile names
    argv = ["bsdtar", "-x", "--no-same-owner", "--no-same-permissions", "-s", ",/,_,g",
            "-f", source, "-C", out]
    result = external.run_tool(ctx, argv, cwd=work, watch=out)
    before = len(part.children)
    members.harvest(ctx, part, out)
    written = sum(1 for child in part.children[before:] if "link" not in child.flags)
    if result.returncode:
        return f"bsdtar exit {result.returncode}: {result.said(work)}", written
    return "", written


def _mark_encrypted(part: Part, ctx: Context, names: list[str], what: str) -> None:
    """Flag the archive; each encrypted member becomes (or stays, when unar left
    an empty file for it) an empty named part, so the banned-name rules still
    see 'invoice.exe' inside a locked rar."""
    part.flags.add("encrypted")
    empty = {child.name: child for child in part.children if not child.size}
    for name in names:
        child = empty.pop(members.clean_name(name), None)
        if child is None:
            child = members.add_member(ctx, part, name, b"")
        child.flags.add("encrypted")
    more = f" {names[0]!r}" + (f" and {len(names) - 1} more" if len(names) > 1 else "") \
        if names else ""
    ctx.note_unchecked(part, what + more, kind="encrypted")
