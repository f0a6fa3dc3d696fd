"""From the daemon's AM.PDP reply (or our own failure) to milter reply packets.

At end of message the MTA gets, in this order: the daemon's header edits
(delete, change, insert, add: amavisd-new's version-2 order, which a milter
MTA applies as it comes), recipient edits, an optional quarantine, then one
final verdict. Which final packet a `return_value` becomes is the table
`FINAL`; nothing here ever turns doubt into an accept: an unknown or missing
return_value, a malformed reply, an edit the MTA did not allow that matters
(recipients) are all the configured `on_error` action (tempfail by default).

SMTP reply texts are sanitised for the MTA: printable ASCII only, lines cut
to a length any MTA takes, `%` doubled (Sendmail reads the text as a
format), multi-line replies as `NNN-` continuation lines, and a code whose
class disagrees with the verdict replaced by ours (Postfix refuses a `y`
whose enhanced code's first digit differs from the reply's).

Pure functions: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from amavisd_client.edits import header_edits
from amavisd_client.milter import codec
from amavisd_client.wire.ampdp import Block

MAX_LINE_TEXT = 400  # characters of text an SMTP reply line carries here (RFC 5321: 512 a line)
MAX_LINES = 8
ON_ERROR_CHOICES = ("tempfail", "reject", "accept")
QUARANTINE_CHOICES = ("discard", "reject")  # return values that may become an MTA hold


@dataclass(frozen=True)
class Negotiated:
    """What option negotiation allowed us to do."""

    version: int = 2
    actions: int = 0
    protocol: int = 0

    def may(self, action: int) -> bool:
        return bool(self.actions & action)


@dataclass(frozen=True)
class Policy:
    """The settings a verdict needs."""

    on_error: str = "tempfail"
    quarantine: frozenset[str] = frozenset()  # return values held in the MTA's quarantine


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _valid_code(code: str, classes: str) -> bool:
    return len(code) == 3 and code.isascii() and code.isdigit() and code[0] in classes \
        and code[1] in "0123456789"


def _valid_xcode(xcode: str, klass: str) -> bool:
    parts = xcode.split(".")
    return (len(parts) == 3 and all(p.isascii() and p.isdigit() for p in parts)
            and parts[0] == klass and len(parts[1]) <= 3 and len(parts[2]) <= 3
            and all(parts))


def reply_text(code: str, xcode: str, text: str, classes: str, default: tuple[str, str, str]
               ) -> str:
    """The `y` text: "NNN x.y.z text", several lines joined by CRLF with
    NNN- continuations; codes outside `classes` give way to `default`."""
    if not _valid_code(code, classes):
        code = default[0]
    if not _valid_xcode(xcode, code[0]):
        xcode = default[1] if default[1][0] == code[0] else f"{code[0]}.0.0"
    lines = [_printable(line).strip()[:MAX_LINE_TEXT]
             for line in text.replace("\r", "\n").split("\n")]
    lines = [line for line in lines if line][:MAX_LINES] or [default[2]]
    out = []
    for n, line in enumerate(lines):
        sep = " " if n == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{xcode} {line.replace('%', '%%')}")
    return "\r\n".join(out)


TEMPFAIL_DEFAULT = ("451", "4.5.0", "Temporary failure, try again later")
REJECT_DEFAULT = ("554", "5.7.0", "Rejected by the virus scanner")


def _setreply(block: Block) -> tuple[str, str, str]:
    fields = (block.fields("setreply", 3) or [[]])[0]
    code, xcode, text = (list(fields) + ["", "", ""])[:3]
    return code, xcode, text


def _reject(block: Block) -> bytes:
    code, xcode, text = _setreply(block)
    return codec.encode(codec.ReplyCode(reply_text(code, xcode, text, "45", REJECT_DEFAULT)))


def _tempfail(block: Block) -> bytes:
    code, xcode, text = _setreply(block)
    return codec.encode(codec.ReplyCode(reply_text(code, xcode, text, "4", TEMPFAIL_DEFAULT)))


# return_value -> the final packet. "continue" and "accept" both accept at end
# of message; "accept" also skips any later milter's events (the MTA's business).
CONTINUE, ACCEPT, DISCARD = (codec.encode(r) for r in (codec.Continue(), codec.Accept(),
                                                        codec.Discard()))
FINAL: dict[str, Callable[[Block], bytes]] = {
    "continue": lambda block: CONTINUE,
    "accept": lambda block: ACCEPT,
    "discard": lambda block: DISCARD,
    "reject": _reject,
    "tempfail": _tempfail,
}

ON_ERROR: dict[str, Callable[[], bytes]] = {
    "tempfail": lambda: codec.encode(codec.ReplyCode(
        "451 4.3.0 Virus scanner unavailable, try again later")),
    "reject": lambda: codec.encode(codec.ReplyCode(
        "554 5.7.0 Virus scanner unavailable, message rejected")),
    "accept": lambda: codec.encode(codec.Continue()),  # only when configured so
}


class BadVerdict(Exception):
    """The daemon's reply cannot be carried out: the on_error action applies."""


def _clean(text: str) -> str:
    """A header value or name fit for the MTA: no NUL, no CR; a line break
    only as a fold (followed by whitespace), never a new header."""
    text = text.replace("\0", "").replace("\r\n", "\n").replace("\r", "")
    lines = text.split("\n")
    return "\n".join([lines[0]] + [ln if ln[:1] in (" ", "\t") else "\t" + ln
                                   for ln in lines[1:]])


def _header_name_ok(name: str) -> bool:
    """Printable ASCII but for the space, without a colon ('!' to '~' but
    ':'): whole-string C checks, not a character at a time in Python."""
    return (name != "" and name.isascii() and name.isprintable() and " " not in name
            and ":" not in name)


def edit_packets(block: Block, negotiated: Negotiated) -> list[bytes]:
    """The daemon's header and recipient edits as packets. Header edits
    the MTA did not allow are left out (the verdict stands without its
    X-Virus-Scanned); recipient edits it did not allow raise BadVerdict
    (carrying the verdict to the wrong recipients is not an option)."""
    lead = " " if negotiated.protocol & codec.SMFIP_HDR_LEADSPC else ""
    packets = []
    for op, fields in header_edits(block):
        try:
            if op in ("insheader", "addheader"):
                if not negotiated.may(codec.SMFIF_ADDHDRS):
                    continue
                name, value = fields[-2], fields[-1]
                if not _header_name_ok(name):
                    raise BadVerdict(f"bad header name {name[:40]!r} in {op}")
                value = lead + _clean(value).lstrip(" \t")
                reply = (codec.InsertHeader(int(fields[0]), name, value) if op == "insheader"
                         else codec.AddHeader(name, value))
            else:
                if not negotiated.may(codec.SMFIF_CHGHDRS):
                    continue
                index, name = int(fields[0]), fields[1]
                value = fields[2] if op == "chgheader" and len(fields) == 3 else ""
                if not _header_name_ok(name):
                    raise BadVerdict(f"bad header name {name[:40]!r} in {op}")
                value = _clean(value).lstrip(" \t")
                reply = codec.ChangeHeader(index, name, lead + value if value else "")
            packets.append(codec.encode(reply))
        except (ValueError, IndexError):
            raise BadVerdict(f"malformed {op} {fields!r:.80}") from None
    for attr, make, action in (("delrcpt", codec.DelRcpt, codec.SMFIF_DELRCPT),
                               ("addrcpt", codec.AddRcpt, codec.SMFIF_ADDRCPT)):
        for rcpt in block.getall(attr):
            if not negotiated.may(action):
                raise BadVerdict(f"amavisd asked for {attr} but the MTA does not allow it")
            try:
                packets.append(codec.encode(make(rcpt)))
            except ValueError:
                raise BadVerdict(f"malformed {attr}") from None
    return packets


def verdict_packets(block: Block, negotiated: Negotiated, policy: Policy) -> bytes:
    """Everything the MTA gets at end of message for this reply.
    Raises BadVerdict when the reply cannot be carried out."""
    if block.errors:
        raise BadVerdict("malformed reply: " + "; ".join(block.errors[:2]))
    outcome = block.get("return_value")
    final = FINAL.get(outcome or "")
    if final is None:
        raise BadVerdict(f"reply without a usable return_value ({outcome!r})")
    packets = edit_packets(block, negotiated)
    reason = block.get("quarantine")
    hold = outcome in policy.quarantine and negotiated.may(codec.SMFIF_QUARANTINE)
    if hold and not reason:
        reason = _setreply(block)[2] or f"amavisd: {outcome}"
    if reason and negotiated.may(codec.SMFIF_QUARANTINE):
        packets.append(codec.encode(codec.Quarantine(_printable(reason)[:MAX_LINE_TEXT])))
    # Held mail is accepted into the MTA's hold queue; a quarantine the daemon
    # asked for on its own keeps the daemon's verdict.
    packets.append(CONTINUE if hold else final(block))
    return b"".join(packets)


def failure_packets(policy: Policy) -> bytes:
    return ON_ERROR[policy.on_error]()
