"""The envelope of one message and the job a worker runs for it."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class Job:
    """One message to check: where its bytes are, and who sent it to whom."""

    log_id: str
    mail_path: str
    envelope: Envelope = field(default_factory=Envelope)
