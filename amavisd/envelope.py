"""The envelope of one message and the job a worker runs for it.

Envelope values come from the client (AM.PDP, and later milter and SMTP) and
end up in the log line, in notifications and in SMTP commands at release:
control characters are replaced on the way in, so no ingress can forge a log
line or smuggle a command.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amavisd.printable import printable


def bare_address(address: str) -> str:
    """'<a@b>' -> 'a@b'; '<>' -> '' (the null sender)."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def angled(address: str) -> str:
    """An address as logs and reports show it: '<a@b>', '<>' for the null sender."""
    return f"<{bare_address(address)}>"


@dataclass
class Envelope:
    sender: str = "<>"
    recipients: list[str] = field(default_factory=list)
    queue_id: str = ""
    client_address: str = ""
    client_name: str = ""
    helo_name: str = ""
    protocol_name: str = ""
    policy_bank: str = ""

    def __post_init__(self) -> None:
        # every field, by name: one envelope a request (a loop over
        # dataclasses.fields() cost five times the calls)
        self.sender = printable(self.sender)
        self.recipients = [printable(v) for v in self.recipients]
        self.queue_id = printable(self.queue_id)
        self.client_address = printable(self.client_address)
        self.client_name = printable(self.client_name)
        self.helo_name = printable(self.helo_name)
        self.protocol_name = printable(self.protocol_name)
        self.policy_bank = printable(self.policy_bank)


@dataclass
class Job:
    """One message to check: where its bytes are, and who sent it to whom."""

    log_id: str
    mail_path: str
    envelope: Envelope = field(default_factory=Envelope)
    # The message already opened by the ingress at its trust boundary (AM.PDP:
    # beneath the temp base, checked); the pipeline then reads this descriptor
    # and never looks the client's path up again. -1: open mail_path.
    mail_fd: int = -1
    # The policy banks of the listener it came in by (interface_policy), set
    # by the worker, which knows the door; ingresses leave it empty.
    interface_banks: tuple[str, ...] = ()
