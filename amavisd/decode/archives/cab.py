"""Microsoft Cabinet (stored, MSZIP, LZX, Quantum): cabextract, boxed.

Measured on the corpus (archives/cab 12 samples, corrupt/*.cab 8), per cab:
cabextract alone 1.0-2.8 ms, 7zz 3.5-5 ms, gcab 4-12 ms (and gcab made a file
named after an absolute path found in a corrupt cab, the CVE-2014-9732
sample). A whole decode through run_tool: median 24 ms today, 4.7 ms if
run_tool waited on the process instead of sleeping 20 ms. A throw-away
in-process MSZIP reader (CFFOLDER/CFDATA, zlib with the previous block as
dictionary) took 0.005-0.17 ms on the 6 MSZIP/stored samples; it would cover
only those, LZX and Quantum still need cabextract. Some 4 ms a cab, for a
format rare in mail, does not pay for a second parser of hostile input whose
slip would hide members (an expanded part is not scanned itself), so
cabextract reads every cab.

When cabextract fails (or is missing), 7zz (another decoder) reads the cab
again into its own dir, and what it writes is scanned too. If 7zz reads it
all, the cab is decode-error; if neither did, a member could not be produced:
`Undecipherable`, UNCHECKED with all that was read scanned (a cab cut short
too: the readers drop a whole folder, bytes that are there included). One
cabinet of a set is only flagged truncated: its members go on in cabinets
that are not here (as for rar volumes and split 7z/zip pieces).

An exit code of 0 is not "everything was read": cabextract writes two
members of one name to one file, the second over the first. So a reading
that wrote fewer files than the header lists (CFHEADER.cFiles) failed too,
and 7zz (`-aou`: the second is renamed) reads the cab again.

Never: let cabextract open another file than ours (`-s`: a cab names the next
cabinet of its set, and that name is hostile), or use a member name as a path.
"""

from __future__ import annotations

import os

from amavisd.decode import external
from amavisd.decode.archives import members
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, Undecipherable, register

FILES_OFFSET = 28  # CFHEADER.cFiles
FLAGS_OFFSET = 30  # CFHEADER.flags
IN_A_SET = 0x0001 | 0x0002  # cfhdrPREV_CABINET, cfhdrNEXT_CABINET


@register("cab")
def decode_cab(part: Part, ctx: Context) -> None:
    head = part.head(FLAGS_OFFSET + 2)
    listed = int.from_bytes(head[FILES_OFFSET:FILES_OFFSET + 2], "little")
    if int.from_bytes(head[FLAGS_OFFSET:FLAGS_OFFSET + 2], "little") & IN_A_SET:
        part.flags.add("truncated")  # one cabinet of a set; the others are not here
        listed = 0  # some of its files are in the others: not counted
    work = ctx.scratch_dir(part)
    source = external.input_path(ctx, part, work, "input.cab")
    problems = []
    for reader in READERS:  # the next one reads only when the one before failed
        before = len(part.children)
        problem = reader(part, ctx, work, source)
        written = len(part.children) - before
        if not problem and written < listed:
            tool = reader.__name__.removeprefix("_with_")
            problem = f"{tool} wrote {written} of the {listed} files the cabinet lists" + (
                " (some of one name?)" if written else "")
        if not problem:
            break
        problems.append(problem)
    else:
        if "truncated" not in part.flags:
            raise Undecipherable("; ".join(problems))
    if problems:  # one reader failed, or both did on one cabinet of a set
        raise DecodeError("; ".join(problems))
    if "truncated" not in part.flags:
        part.flags.add("expanded")


def _with_cabextract(part: Part, ctx: Context, work: str, source: str) -> str:
    """One reading; what went wrong ("" when all is well)."""
    if not external.available("cabextract"):
        return "cabextract is not installed"
    out = os.path.join(work, "out")
    os.mkdir(out, 0o700)
    result = external.run_tool(ctx, ["cabextract", "-q", "-s", "-d", out, source],
                               cwd=work, watch=out)
    members.harvest(ctx, part, out)
    return f"cabextract exit {result.returncode}: {result.said(work)}" if result.returncode \
        else ""


def _with_7zz(part: Part, ctx: Context, work: str, source: str) -> str:
    """The second reading (another decoder); what went wrong ("" when all is well)."""
    if not external.available("7zz"):
        return "7zz is not installed"
    out = os.path.join(work, "out-7zz")
    os.mkdir(out, 0o700)
    result = external.run_tool(ctx, ["7zz", "x", "-tcab", "-y", "-aou", "-bd", f"-o{out}",
                                     "--", source], cwd=work, watch=out)
    members.harvest(ctx, part, out)
    report = external.SevenZipReport.read(result, work)
    if report.failed or report.wrong_password:
        return f"7zz exit {result.returncode}: {report.said()}"
    return ""


READERS = (_with_cabextract, _with_7zz)
