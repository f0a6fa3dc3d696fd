"""A bounce for the recipients the next hop refused while it took the others.

With AM.PDP's delivery_care_of=server we forward the mail ourselves and
answer the MTA once, for all recipients. When the next hop takes the message
for some recipients and refuses others for good (5xx), amavisd-new answers
"250 ... , but 1 REJECT" (the MTA drops its copy) and bounces the refused
recipients itself: a delivery status notification (RFC 3464) to the
envelope sender, through `notify_method`. So do we, so that a refusal is
never lost. Never to the null sender: a bounce is not bounced.

Only the next hop's own replies go into it (what it would have told the
sender without us), and the original header; the next hop's address stays
in our log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from email import policy
from email.message import EmailMessage, Message, MIMEPart
from email.utils import formatdate, make_msgid

from amavisd.actions.forward import forwarder
from amavisd.actions.notify import NotifySettings, clean, original_headers
from amavisd.actions.relayed import relayed
from amavisd.envelope import Envelope, bare_address

log = logging.getLogger("amavisd.notify")


def _block(fields: list[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in fields:
        block[name] = value
    return block


def build(refused: Mapping[str, str], envelope: Envelope, original: bytes,
          settings: NotifySettings, log_id: str) -> EmailMessage:
    """The DSN: a human part, message/delivery-status (one block a refused
    recipient, with the next hop's reply), and the original header."""
    sender = bare_address(envelope.sender)
    msg = EmailMessage()
    msg["From"] = settings.from_header
    msg["To"] = clean(sender)
    msg["Subject"] = "Undeliverable mail: refused by the next mail server"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=settings.myhostname or None)
    msg["Auto-Submitted"] = "auto-replied"
    lines = [f"This is the content filter at {clean(settings.myhostname)}.", "",
             "Your message was delivered to its other recipients, but the next mail",
             "server refused these:", ""]
    lines += [f"  <{clean(r)}>: {clean(why)}" for r, why in refused.items()]
    lines += ["", f"Our id: {clean(log_id)}. The delivery status report and the header of",
              "your message follow."]
    body = "\n".join(lines) + "\n"
    msg.set_content(body, cte=None if body.isascii() else "quoted-printable")
    msg.make_mixed()
    msg.set_type("multipart/report")
    msg.set_param("report-type", "delivery-status")
    now = formatdate(localtime=True)
    blocks = [_block([("Reporting-MTA", f"dns; {clean(settings.myhostname)}"),
                      ("Arrival-Date", now)])]
    for rcpt, why in refused.items():
        _, enhanced, _ = relayed("-", why)
        kind = "rfc822" if rcpt.isascii() else "utf-8"
        blocks.append(_block([("Final-Recipient", f"{kind}; {clean(rcpt)}"),
                              ("Action", "failed"), ("Status", enhanced),
                              ("Diagnostic-Code", f"smtp; {clean(why)[:900]}"),
                              ("Last-Attempt-Date", now)]))
    status = MIMEPart()
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(blocks)
    msg.attach(status)
    header = original_headers(original).decode("utf-8", "replace")
    part = MIMEPart()
    part.set_content(header, subtype="rfc822-headers",
                     cte=None if header.isascii() else "quoted-printable")
    msg.attach(part)
    return msg


def bounce(config: Mapping, refused: Mapping[str, str], envelope: Envelope, original: bytes,
           log_id: str) -> None:
    """Send the DSN for `refused` through notify_method. Raises ForwardError
    when the notify method did not take it (the caller decides; amavisd-new
    tempfails the message when the failure is temporary)."""
    if not bare_address(envelope.sender):
        log.info("(%s) no DSN for %s refused by the next hop: null sender", log_id,
                 ", ".join(refused))
        return
    settings = NotifySettings.from_config(config)
    data = build(refused, envelope, original, settings, log_id).as_bytes(policy=policy.SMTP)
    transport = forwarder(config["notify_method"], config["smtp_timeout"])
    transport.hand_over("", [bare_address(envelope.sender)], data, per_recipient=True)
    log.info("(%s) DSN sent to <%s> for %s refused by the next hop", log_id,
             bare_address(envelope.sender), ", ".join(refused))
