"""Decomposition: from raw message bytes to the full part tree.

Content drives it: each part's type is sniffed from its bytes, and the
registered decoder for that type adds its children, layer by layer, down to
`max_depth`. A limit stops that branch or the whole message and leaves a
reason in `unchecked`. Nothing a message contains can make this raise, and
nothing a decoder fails to do can make a message CLEAN:

- `DecodeError`: the input is not quite what it claimed (a text part that
  looked like uuencode, a truncated member); the part is flagged and scanned
  as it is, as are its children.
- `Undecipherable`: a container whose content we could not all read; what
  was read is scanned and the message is UNCHECKED (kind `undecipherable`).
- anything else is a decoder failure (a bug, or input it was not built
  for): UNCHECKED of kind `internal`, the traceback logged once a message.
- `WorkDirFailed` (disk full, I/O error) and `MemoryError` are ours, not the
  message's: they propagate, and the pipeline answers tempfail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from amavisd.decode import detect
from amavisd.decode.limits import LimitExceeded, Limits
from amavisd.decode.parts import Part
from amavisd.decode.registry import (
    PROBES,
    REGISTRY,
    RESOURCE_ERRNOS,
    Context,
    DecodeError,
    Undecipherable,
    WorkDirFailed,
)

# Importing the decoder modules registers them.
from amavisd.decode import archives, compressed, mime, textual  # noqa: F401, E402  isort: skip

log = logging.getLogger("amavisd.decode")


@dataclass
class Decomposition:
    root: Part
    unchecked: list[str] = field(default_factory=list)
    context: Context | None = None

    def scannable(self) -> list[Part]:
        return list(self.root.scannable())

    def cleanup(self) -> None:
        if self.context is not None:
            self.context.cleanup()


def decompose(raw: bytes, limits: Limits | None = None, tempbase: str | None = None,
              use_magic: bool = False, bare_file: bool = False) -> Decomposition:
    """Decode `raw`, a message, or with `bare_file` any file (an archive to
    look into, say): then the root's type is sniffed like any part's."""
    limits = limits or Limits()
    ctx = Context(limits, len(raw), tempbase)
    if bare_file:
        root = ctx.new_part(raw)
    else:
        root = ctx.new_part(raw, mime_type="message/rfc822", detected="mail")
    ctx.budget.charge_part()
    result = Decomposition(root, ctx.unchecked, ctx)
    stack = [root]
    try:
        while stack:
            part = stack.pop()
            try:
                ctx.budget.check_time()
                decode_one(part, ctx, use_magic)
            except LimitExceeded as err:
                part.flags.add("limit")
                ctx.note_unchecked(part, err.reason)
                if err.scope == "message":
                    break
            stack.extend(reversed(part.children))
    except BaseException:  # the caller gets no decomposition to clean up
        ctx.cleanup()
        raise
    return result


def decode_one(part: Part, ctx: Context, use_magic: bool) -> None:
    """Sniff, probe and decode one part. Everything that reads the part's
    bytes runs under the same rules: type sniffing and probes (which look for
    archives inside programs) read hostile bytes as much as decoders do."""
    try:
        head = part.head(detect.HEAD_SIZE)
        if not part.detected and part.size:
            part.detected = detect.sniff(head)
        if use_magic and not part.detected_mime and part.size and not part.expanded:
            part.detected_mime = detect.magic_mime(head)
        decoder = REGISTRY.get(part.detected)
        if decoder is None or part.expanded:
            return
        probe = PROBES.get(part.detected)
        if probe is not None and not probe(part):
            return
        if part.depth >= ctx.limits.max_depth:
            part.flags.add("too-deep")
            ctx.note_unchecked(part, f"nested deeper than {ctx.limits.max_depth} levels")
            return
        decoder(part, ctx)
    except (LimitExceeded, WorkDirFailed, MemoryError):
        raise
    except Undecipherable as err:
        part.flags.add("undecipherable")
        ctx.note_unchecked(part, f"{part.detected}: {err}", kind="undecipherable")
    except DecodeError as err:
        part.flags.add("decode-error")
        log.debug("%s: %s", part.path, err)
    except OSError as err:
        if err.errno in RESOURCE_ERRNOS:  # the machine's problem, not the message's
            raise WorkDirFailed(f"decoding {part.path}: {err.strerror}") from None
        decoder_failed(part, ctx, err)
    except Exception as err:
        decoder_failed(part, ctx, err)


def decoder_failed(part: Part, ctx: Context, err: Exception) -> None:
    """A decoder broke: the part is scanned as it is, but the message can no
    longer be called CLEAN, since what the decoder would have found is unknown."""
    part.flags.add("internal-error")
    ctx.note_unchecked(part, f"decoder {part.detected} failed: {type(err).__name__}",
                       kind="internal")
    if not ctx.logged_failure:  # one traceback a message, not one a part
        ctx.logged_failure = True
        log.error("decoder %s failed on %s", part.detected, part.path, exc_info=err)
