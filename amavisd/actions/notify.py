"""Notifications: the admin alert, the sender's DSN, the recipients' notice.

Who is told (amavisd-new's rules, backscatter first):
- the admin (virusalert@<first local domain> by default): for the
  categories in `admin_notify`, whatever the destiny;
- the sender: only when the destiny is BOUNCE (we then write the bounce
  ourselves, as an RFC 3464 DSN), only for the categories in
  `sender_notify` (default: banned, never viruses, whose senders are
  forged), only to senders of a local domain unless `sender_notify_remote`,
  and never to the null sender, a mailer-daemon, or mail marked bulk/list/
  junk or auto-submitted (RFC 3834). A suppressed bounce is a discard;
  and, for originating mail (from our own users: the MYNETS or ORIGINATING
  policy bank, `originating`), when it is discarded too, since no one else
  tells them: still only to a sender of a local domain, so mail a stranger
  sent through us (a forward) never brings them backscatter;
- each local recipient, for the categories in `recipient_notify` (default
  none), when the mail was not delivered.

The texts are plain-text templates, shipped as package data
(`amavisd/templates/*.txt`, found with importlib.resources wherever amavisd
is installed) and overridden file by file from `template_dir` or
/etc/amavisd/templates: optional `Subject:` line, blank line, body, with {placeholders} filled by
str.format_map. Templates are checked when loaded (only known placeholder
names, no attribute/index access, no conversions or format specs), and the
values are plain strings cleaned of control characters, so a hostile subject
or file name is only ever text, never evaluated and never a header break.

Sending goes through a Forwarder (actions/forward.py). A notification that
cannot be built or sent is logged and reported as False: it must never raise
into the pipeline, whose verdict stands whatever happens here.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesHeaderParser
from email.utils import format_datetime, formatdate, make_msgid
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from amavisd.actions.forward import Forwarder
from amavisd.envelope import Envelope, angled, bare_address
from amavisd.verdict import Category, Destiny, Result

log = logging.getLogger("amavisd.notify")

SYSTEM_TEMPLATE_DIR = "/etc/amavisd/templates"
# The shipped set is package data, not a path relative to this file: it is
# found the same way from a checkout, a venv or a distribution's package.
SHIPPED_TEMPLATES: Traversable = resources.files("amavisd").joinpath("templates")

# The placeholders a template may use; each filled with a cleaned string.
PLACEHOLDERS: dict[str, str] = {
    "log_id": "our id of the message (in the log line)",
    "queue_id": "the MTA's queue id",
    "sender": "envelope sender (<> for the null sender)",
    "recipients": "envelope recipients, comma separated",
    "recipient": "the one recipient a recipient notice goes to",
    "subject": "the original Subject:",
    "message_id": "the original Message-ID:",
    "header_from": "the original From:",
    "date": "now (RFC 5322 date)",
    "myhostname": "this host's name",
    "verdict": "INFECTED, BANNED, UNCHECKED or CLEAN",
    "summary": "the one-line verdict, e.g. INFECTED: Eicar-Test-Signature",
    "viruses": "virus names, comma separated",
    "banned": "banned parts and the rules that banned them, one a line",
    "unchecked": "why parts could not be checked, one a line",
    "findings": "each virus with the part it was found in, one a line",
    "quarantine_id": "the quarantine id, or '-'",
    "client_address": "the SMTP client's address",
    "admin": "the admin's address",
}

# (category, role) -> template; a role's fallback when the pair has none.
TEMPLATES: dict[tuple[Category, str], str] = {
    (Category.INFECTED, "admin"): "virus-admin.txt",
    (Category.BANNED, "admin"): "banned-admin.txt",
    (Category.INFECTED, "sender"): "virus-sender.txt",
    (Category.BANNED, "sender"): "banned-sender.txt",
}
ROLE_TEMPLATES: dict[str, str] = {"admin": "admin.txt", "sender": "dsn.txt",
                                  "recipient": "recipient.txt"}
BULK_PRECEDENCE = {"bulk", "list", "junk"}
NOT_DELIVERED = {Destiny.DISCARD, Destiny.BOUNCE, Destiny.REJECT}
MAX_VALUE = 2000  # characters of one placeholder value
_CONTROL = dict.fromkeys(c for c in range(32) if c not in (9, 10)) | {127: None}


class TemplateError(ValueError):
    """A template that cannot be used: one line naming the file and the fault."""


@dataclass(frozen=True)
class Template:
    name: str
    subject: str
    body: str

    @classmethod
    def parse(cls, name: str, text: str) -> Template:
        head, sep, body = text.partition("\n\n")
        subject = ""
        if sep and head.lower().startswith("subject:"):
            if "\n" in head:
                raise TemplateError(f"template {name}: only a Subject: line may precede "
                                    "the blank line")
            subject = head.split(":", 1)[1].strip()
        else:
            body = text
        for part in (subject, body):
            check_fields(name, part)
        return cls(name, subject, body)

    def render(self, values: Mapping[str, str]) -> tuple[str, str]:
        subject = self.subject.format_map(values)
        return " ".join(subject.split()), self.body.format_map(values)


def check_fields(name: str, text: str) -> None:
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as err:
        raise TemplateError(f"template {name}: {err}") from None
    for _, field_name, spec, conversion in fields:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS:
            raise TemplateError(f"template {name}: unknown placeholder {{{field_name}}}; "
                                f"known: {', '.join(PLACEHOLDERS)}")
        if spec or conversion:
            raise TemplateError(f"template {name}: {{{field_name}}} takes no "
                                "conversion or format spec")


# Template texts read by the master before it drops root (`load_templates`),
# path -> text: workers inherit them, so a template dir only root can read
# still works after the drop. HUP reads them again.
_LOADED: dict[str, str] = {}


def template_dirs(config: Mapping[str, Any]) -> list[str]:
    """The template dirs a daemon may read: the base config's, then each bank's."""
    banks = config.get("policy_banks", {}) or {}
    return [config["template_dir"], *(bank["template_dir"] for bank in banks.values()
                                      if bank.get("template_dir"))]


def load_templates(*template_dirs: str) -> int:
    """Read every template now, into the cache workers inherit; returns how
    many were read. Each dir is a site's set (the base config's and each
    policy bank's `template_dir`: a bank's is read after privileges drop
    otherwise). A missing one is left for `Templates.get` to report."""
    _LOADED.clear()
    for template_dir in dict.fromkeys(template_dirs or ("",)):
        templates = Templates([template_dir] if template_dir else [])
        for filename in set(TEMPLATES.values()) | set(ROLE_TEMPLATES.values()):
            for directory in templates.directories:
                source = directory / filename
                try:
                    _LOADED[str(source)] = source.read_text(encoding="utf-8")
                    break
                except OSError:
                    continue
    return len(_LOADED)


def _is_file(source: Traversable) -> bool:
    """Like os.path.isfile: a directory we may not search has no file."""
    try:
        return source.is_file()
    except OSError:
        return False


class Templates:
    """Template files looked up in order: the configured directory first,
    then the ones shipped with amavisd (so a site overrides only some)."""

    def __init__(self, directories: Iterable[str] = ()):
        self.directories: list[Traversable] = [
            *(Path(d) for d in directories if d), Path(SYSTEM_TEMPLATE_DIR), SHIPPED_TEMPLATES]
        self._cache: dict[str, Template] = {}

    def get(self, filename: str) -> Template:
        if filename not in self._cache:
            for directory in self.directories:
                source = directory / filename
                if str(source) in _LOADED:
                    self._cache[filename] = Template.parse(filename, _LOADED[str(source)])
                    break
                if _is_file(source):
                    text = source.read_text(encoding="utf-8")
                    self._cache[filename] = Template.parse(filename, text)
                    break
            else:
                raise TemplateError(f"template {filename}: not found in "
                                    f"{', '.join(map(str, self.directories))}")
        return self._cache[filename]

    def for_role(self, category: Category, role: str) -> Template:
        return self.get(TEMPLATES.get((category, role), ROLE_TEMPLATES[role]))

    def check_all(self) -> None:
        """Load every template now (check-config, boot): fail early, not per mail."""
        for filename in set(TEMPLATES.values()) | set(ROLE_TEMPLATES.values()):
            self.get(filename)


@dataclass
class NotifySettings:
    myhostname: str
    local_domains: list[str] = field(default_factory=list)
    admin: str = ""  # empty: virusalert@<first local domain, else myhostname>
    admin_notify: list[str] = field(default_factory=lambda: ["infected", "banned"])
    sender_notify: list[str] = field(default_factory=lambda: ["banned"])
    sender_notify_remote: bool = False
    recipient_notify: list[str] = field(default_factory=list)
    notify_from: str = ""  # empty: "Content-filter at HOST" <postmaster@HOST>
    originating: bool = False  # the mail is from our own users (policy banks)

    @classmethod
    def from_config(cls, config: Mapping) -> NotifySettings:
        names = [n for n in cls.__dataclass_fields__ if n != "myhostname"]
        hostname = getattr(config, "hostname", None) or config.get("myhostname", "")
        return cls(myhostname=hostname, **{n: config[n] for n in names if n in config})

    @property
    def admin_address(self) -> str:
        if self.admin:
            return self.admin
        domain = self.local_domains[0].lstrip(".") if self.local_domains else self.myhostname
        return f"virusalert@{domain}"

    @property
    def from_header(self) -> str:
        return self.notify_from or (f'"Content-filter at {self.myhostname}" '
                                    f"<postmaster@{self.myhostname}>")

    def is_local(self, address: str) -> bool:
        """example.com matches that domain; .example.com it and its subdomains."""
        domain = bare_address(address).rpartition("@")[2].lower().rstrip(".")
        for entry in self.local_domains:
            entry = entry.lower()
            if domain == entry.lstrip(".") or (entry.startswith(".") and
                                               domain.endswith(entry)):
                return True
        return False

    def wants(self, role: str, category: Category) -> bool:
        chosen = {"admin": self.admin_notify, "sender": self.sender_notify,
                  "recipient": self.recipient_notify}[role]
        return category.name.lower() in {c.lower() for c in chosen}


@dataclass
class Notice:
    role: str  # admin | sender | recipient
    recipients: list[str]
    message: EmailMessage
    sender: str = ""  # envelope sender: always the null sender, so no loop can start


def clean(value: object) -> str:
    """One line of plain text: no control characters, bounded length."""
    return " ".join(str(value).translate(_CONTROL).split())[:MAX_VALUE]


def _header(headers: Message, name: str) -> str:
    # A hostile header may trip the parser; the notice goes out without it.
    try:
        return str(headers.get(name, ""))
    except Exception:
        return ""


def original_headers(raw: bytes) -> bytes:
    """The header block of a raw message (up to the first empty line)."""
    match = re.search(rb"\r?\n\r?\n", raw[:1024 * 1024])
    return raw[:match.start()] + b"\n" if match else raw[:1024 * 1024]


def placeholders(settings: NotifySettings, result: Result, envelope: Envelope,
                 headers: Message, quarantine_id: str = "") -> dict[str, str]:
    names = {p.path: p.name for p in result.tree.walk()} if result.tree is not None else {}
    findings = [f"{f.name} in {f.part}" + (f" ({names[f.part]!r})" if names.get(f.part) else "")
                + f", found by {f.scanner}" for f in result.findings]
    values = {
        "log_id": result.log_id, "queue_id": envelope.queue_id or "-",
        "sender": angled(envelope.sender),
        "recipients": ", ".join(angled(r) for r in envelope.recipients),
        "recipient": "", "subject": _header(headers, "Subject"),
        "message_id": _header(headers, "Message-ID"), "header_from": _header(headers, "From"),
        "date": formatdate(localtime=True), "myhostname": settings.myhostname,
        "verdict": result.verdict, "summary": result.summary(),
        "viruses": ", ".join(result.viruses), "quarantine_id": quarantine_id or "-",
        "client_address": envelope.client_address or "-", "admin": settings.admin_address,
    }
    values = {k: clean(v) for k, v in values.items()}
    lists = {"banned": result.banned, "unchecked": result.unchecked, "findings": findings}
    values |= {k: "\n".join("  " + clean(v) for v in items) or "  -" for k, items in lists.items()}
    return values


def _envelope_message(settings: NotifySettings, to: Sequence[str], subject: str,
                      auto: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.from_header
    msg["To"] = ", ".join(clean(bare_address(a)) for a in to)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=settings.myhostname or None)
    msg["Auto-Submitted"] = auto
    return msg


def _set_text(msg: EmailMessage, body: str) -> None:
    # 7-bit clean on the wire whatever the placeholders held.
    msg.set_content(body, cte=None if body.isascii() else "quoted-printable")


def _headers_part(header_block: bytes) -> MIMEPart:
    text = header_block.decode("utf-8", "replace")
    part = MIMEPart()
    part.set_content(text, subtype="rfc822-headers",
                     cte=None if text.isascii() else "quoted-printable")
    return part


def admin_alert(settings: NotifySettings, template: Template, values: Mapping[str, str],
                header_block: bytes) -> EmailMessage:
    """What was found, where, the envelope and the quarantine id; the
    original headers attached."""
    subject, body = template.render(values)
    msg = _envelope_message(settings, [settings.admin_address], subject, "auto-generated")
    _set_text(msg, body)
    msg.make_mixed()
    msg.attach(_headers_part(header_block))
    return msg


def recipient_notice(settings: NotifySettings, template: Template, values: Mapping[str, str],
                     recipient: str) -> EmailMessage:
    subject, body = template.render(dict(values, recipient=clean(recipient)))
    msg = _envelope_message(settings, [recipient], subject, "auto-generated")
    _set_text(msg, body)
    return msg


def _block(fields: Iterable[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in fields:
        block[name] = value
    return block


def _address_field(address: str) -> str:
    address = clean(bare_address(address))
    return f"{'rfc822' if address.isascii() else 'utf-8'}; {address}"


def dsn(settings: NotifySettings, template: Template, values: Mapping[str, str],
        result: Result, envelope: Envelope, header_block: bytes,
        arrival: datetime | None = None) -> EmailMessage:
    """RFC 3464: multipart/report; report-type=delivery-status with the
    human text, a message/delivery-status part (every recipient failed,
    5.7.0) and the original headers as text/rfc822-headers."""
    subject, body = template.render(values)
    msg = _envelope_message(settings, [envelope.sender], subject, "auto-replied")
    _set_text(msg, body)
    msg.make_mixed()
    msg.set_type("multipart/report")
    msg.set_param("report-type", "delivery-status")
    now = formatdate(localtime=True)
    diagnostic = clean(f"smtp; 554 5.7.0 Reject, id={result.log_id} - {result.summary()}")[:900]
    blocks = [_block([("Reporting-MTA", f"dns; {settings.myhostname}"),
                      ("Arrival-Date", format_datetime(arrival) if arrival else now)])]
    blocks += [_block([("Final-Recipient", _address_field(rcpt)), ("Action", "failed"),
                       ("Status", "5.7.0"), ("Diagnostic-Code", diagnostic),
                       ("Last-Attempt-Date", now)]) for rcpt in envelope.recipients]
    status = MIMEPart()
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(blocks)
    msg.attach(status)
    msg.attach(_headers_part(header_block))
    return msg


def sender_notice_blocker(settings: NotifySettings, result: Result, envelope: Envelope,
                          headers: Message) -> str | None:
    """Why the sender must not be told (backscatter), or None."""
    sender = bare_address(envelope.sender)
    told_of_discard = settings.originating and result.destiny is Destiny.DISCARD
    if result.destiny is not Destiny.BOUNCE and not told_of_discard:
        return f"destiny is {result.destiny.value}, not bounce"
    if not settings.wants("sender", result.category):
        return f"sender_notify excludes {result.verdict.lower()}"
    if not sender or sender.lower().startswith("mailer-daemon@"):
        return "null sender"
    if not settings.is_local(sender) and (told_of_discard or not settings.sender_notify_remote):
        return "sender not in local_domains"
    if _header(headers, "Precedence").strip().lower() in BULK_PRECEDENCE:
        return "bulk mail (Precedence)"
    if (_header(headers, "Auto-Submitted").strip().lower() or "no") != "no":
        return "auto-submitted mail"
    if _header(headers, "List-Id"):
        return "mailing list mail (List-Id)"
    return None


class Notifier:
    """Decides who is told, builds the messages, sends them; never raises."""

    def __init__(self, settings: NotifySettings, transport: Forwarder | None,
                 templates: Templates | None = None):
        # transport None: build() only (tests, `amavisd scan --explain`).
        self.settings = settings
        self.transport = transport
        self.templates = templates or Templates()

    def build(self, result: Result, envelope: Envelope, original: bytes = b"",
              quarantine_id: str = "", arrival: datetime | None = None) -> list[Notice]:
        """The notices this verdict calls for (no I/O but reading templates)."""
        if result.category is None or result.category is Category.CLEAN:
            return []
        block = original_headers(original)
        headers = BytesHeaderParser(policy=policy.default).parsebytes(block)
        values = placeholders(self.settings, result, envelope, headers, quarantine_id)
        category, notices = result.category, []
        if self.settings.wants("admin", category):
            template = self.templates.for_role(category, "admin")
            notices.append(Notice("admin", [self.settings.admin_address],
                                  admin_alert(self.settings, template, values, block)))
        why_not = sender_notice_blocker(self.settings, result, envelope, headers)
        if why_not is None:
            template = self.templates.for_role(category, "sender")
            notices.append(Notice("sender", [bare_address(envelope.sender)],
                                  dsn(self.settings, template, values, result, envelope,
                                      block, arrival)))
        elif result.destiny is Destiny.BOUNCE or self.settings.originating:
            log.info("(%s) no DSN to %s: %s", result.log_id, envelope.sender or "<>", why_not)
        if self.settings.wants("recipient", category) and result.destiny in NOT_DELIVERED:
            template = self.templates.for_role(category, "recipient")
            for rcpt in envelope.recipients:
                if self.settings.is_local(rcpt):
                    notices.append(Notice("recipient", [bare_address(rcpt)],
                                          recipient_notice(self.settings, template, values,
                                                           bare_address(rcpt))))
        return notices

    def send(self, notice: Notice, log_id: str = "-") -> bool:
        try:
            data = notice.message.as_bytes(policy=policy.SMTP)
            refused = self.transport.send(notice.sender, notice.recipients, data)
        except Exception as err:  # a notice must never break the verdict
            log.warning("(%s) %s notification to %s failed: %s", log_id, notice.role,
                        ", ".join(notice.recipients), err)
            return False
        if refused:
            log.warning("(%s) %s notification refused for %s", log_id, notice.role,
                        "; ".join(f"{r}: {why}" for r, why in refused.items()))
        log.info("(%s) %s notification sent to %s", log_id, notice.role,
                 ", ".join(notice.recipients))
        return True

    def notify(self, result: Result, envelope: Envelope, original: bytes = b"",
               quarantine_id: str = "", arrival: datetime | None = None
               ) -> list[tuple[Notice, bool]]:
        """Build and send every notice; (notice, sent?) pairs. Never raises."""
        try:
            notices = self.build(result, envelope, original, quarantine_id, arrival)
        except Exception as err:
            log.warning("(%s) notifications not built: %s", result.log_id, err)
            return []
        return [(n, self.send(n, result.log_id)) for n in notices]
