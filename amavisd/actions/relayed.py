"""The next hop's reply, passed on as amavisd-new passes it on.

When we hand mail to the next hop ourselves (a release, AM.PDP
delivery_care_of=server, the SMTP filter), the requester hears what the
next hop said, in amavisd-new's words (Amavis::Out::SMTP
enhance_smtp_response): its code, its enhanced status code (X.0.0 when it
gave none), and the text "from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok:
queued as ...".
"""

from __future__ import annotations

import re

from amavisd.printable import printable

_HOP_REPLY = re.compile(r"([245][0-9][0-9])(?:[ -]+([245]\.[0-9]{1,3}\.[0-9]{1,3}))?\b")


def relayed(where: str, said: str) -> tuple[str, str, str]:
    """(code, enhanced code, text) for the next hop at `where` having said
    `said`; a line that is no SMTP reply is passed on as a 451."""
    said = printable(said)[:500]
    match = _HOP_REPLY.match(said)
    if match is None:  # not an SMTP reply: nothing we can vouch for
        return "451", "4.5.0", f"from MTA({where}): unexpected reply"
    code = match.group(1)
    return code, match.group(2) or f"{code[0]}.0.0", f"from MTA({where}): {said}"
