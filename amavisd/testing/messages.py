"""Test messages built at run time (EICAR is never stored in the repository)."""

from __future__ import annotations

import base64

from amavisd.testing.eicar import EICAR


def clean_message(subject: str = "hello", body: str = "Just text, nothing to see.\n") -> bytes:
    return (
        "From: alice@example.test\nTo: bob@example.test\n"
        f"Subject: {subject}\nMessage-ID: <{subject.replace(' ', '.')}@example.test>\n"
        f"MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n{body}"
    ).encode()


def eicar_message(filename: str = "eicar.com", subject: str = "virus") -> bytes:
    """EICAR as a base64 attachment: only a MIME decoder can hand clamd the bytes."""
    attachment = base64.encodebytes(EICAR).decode()
    return (
        "From: mallory@example.test\nTo: bob@example.test\n"
        f"Subject: {subject}\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b0undary"\n\n'
        "--b0undary\nContent-Type: text/plain\n\nPlease see the attachment.\n"
        f"--b0undary\nContent-Type: application/octet-stream; name=\"{filename}\"\n"
        f"Content-Disposition: attachment; filename=\"{filename}\"\n"
        f"Content-Transfer-Encoding: base64\n\n{attachment}--b0undary--\n"
    ).encode()


def forwarded_eicar_message() -> bytes:
    """EICAR inside an attached message/rfc822: amavisd-new misses this one."""
    inner = eicar_message(subject="inner").decode()
    return (
        "From: carol@example.test\nTo: bob@example.test\nSubject: Fwd: virus\n"
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="outer"\n\n'
        "--outer\nContent-Type: text/plain\n\nForwarding this.\n"
        f"--outer\nContent-Type: message/rfc822\n\n{inner}\n--outer--\n"
    ).encode()
