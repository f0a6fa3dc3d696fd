"""What a client is told when we cannot do our work, and what only the log hears.

A reply travels far: AM.PDP's setreply goes to the milter, the milter hands
it to the MTA, and the MTA repeats it to the sending client on the
Internet (milter and SMTP ingresses show it the same way). So a reply names
only the *class* of a failure, "virus scanner unavailable"; the detail
(socket paths, errno texts, host names and ports, the quarantine's
location, a traceback's exception) goes to the log line, under the log id.
`Result.summary()` shows the class; `Result.tempfail_reason` keeps the
detail for the log.

amavisd-new's replies for the same classes, for comparison: a dead scanner
is "451 4.5.0 Error in processing, id=..., virus_scan FAILED: AV: ALL VIRUS
SCANNERS FAILED" (with $virus_scanners_failure_is_fatal; by default it
passes the mail), a forward the next hop refuses "id=... - Temporary MTA
failure on relaying" / "Rejected by next-hop MTA on relaying" (which we use
as they are), a request it cannot act on "450 4.5.0 Failure: <the Perl
error, path and line number included>" (we keep the shape, not the leak).

Exceptions are classed by the name of their class, looked up along the
MRO, so this module imports nothing of the daemon and any module may use
it (verdict, scan, protocol, quarantine) without an import circle. A class
that is renamed falls back to "temporary local problem": vaguer, never a
leak (a unit test checks that every name here is a real class).
"""

from __future__ import annotations

# -- the classes a reply may name ---------------------------------------------------

SCANNER_UNAVAILABLE = "virus scanner unavailable"
LOCAL_PROBLEM = "temporary local problem"  # our disk, work dir, memory, temp base
MESSAGE_UNREADABLE = "message file unreadable"
QUARANTINE_UNAVAILABLE = "quarantine unavailable"
TIME_EXCEEDED = "processing time exceeded (child_timeout)"
INTERNAL_ERROR = "internal error"  # a bug of ours: the traceback is in the log
# amavisd-new's own texts (its CC_MTA reasons) for a forward that did not go
RELAY_TEMPFAIL = "Temporary MTA failure on relaying"
RELAY_REJECTED = "Rejected by next-hop MTA on relaying"
RELAY_FAILED = "Unable to relay message back to MTA"  # refused for good by us, not the hop

# Exception class name -> the class of failure it is. The first name found
# along the exception's MRO decides.
BY_CLASS_NAME: dict[str, str] = {
    "ScannerError": SCANNER_UNAVAILABLE,  # amavisd.scan.base: no scanner answered
    "MessageUnreadable": MESSAGE_UNREADABLE,  # amavisd.pipeline
    "QuarantineFailed": QUARANTINE_UNAVAILABLE,  # amavisd.pipeline
    "QuarantineError": QUARANTINE_UNAVAILABLE,  # amavisd.quarantine.entry
    "ForwardError": RELAY_TEMPFAIL,  # amavisd.actions.outcome
    "WorkDirFailed": LOCAL_PROBLEM,  # amavisd.decode.registry: disk full, I/O error
    "MemoryError": LOCAL_PROBLEM,
    "OSError": LOCAL_PROBLEM,
}


def public_reason(err: BaseException) -> str:
    """The class of failure `err` is, for a reply: no path, errno or address."""
    for cls in type(err).__mro__:
        text = BY_CLASS_NAME.get(cls.__name__)
        if text is not None:
            return text
    return LOCAL_PROBLEM


def detail(err: BaseException) -> str:
    """What the log says about `err`: its own text, else its class name."""
    return str(err) or type(err).__name__


def refused(what: str) -> str:
    """A request we will not act on: `what` says which rule it broke, in the
    protocol's words, never a path (the client knows what it sent)."""
    return f"request refused: {what}"
