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

Never: let cabextract open another file than ours (`-s`: a cab names the next
cabinet of its set, and that name is hostile), or use a member name as a path.
"""

from __future__ import annotations

import os

from amavisd.decode.archives import external, members
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, register

FLAGS_OFFSET = 30  # CFHEADER.flags
IN_A_SET = 0x0001 | 0x0002  # cfhdrPREV_CABINET, cfhdrNEXT_CABINET


@register("cab")
def decode_cab(part: Part, ctx: Context) -> None:
    if not external.available("cabextract"):
        raise DecodeError("cab needs cabextract, which is not installed")
    head = part.head(FLAGS_OFFSET + 2)
    if int.from_bytes(head[FLAGS_OFFSET:FLAGS_OFFSET + 2], "little") & IN_A_SET:
        part.flags.add("truncated")  # one cabinet of a set; the others are not here
    work = ctx.scratch_dir(part)
    source = external.input_path(ctx, part, work, "input.cab")
    out = os.path.join(work, "out")
    os.mkdir(out, 0o700)
    result = external.run_tool(ctx, ["cabextract", "-q", "-s", "-d", out, source],
                               cwd=work, watch=out)
    members.harvest(ctx, part, out)
    if result.returncode:
        raise DecodeError(f"cabextract exit {result.returncode}: {' '.join(result.text.split())[:200]}")
    if "truncated" not in part.flags:
        part.flags.add("expanded")
