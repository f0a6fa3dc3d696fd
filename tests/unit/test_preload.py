"""After `preload()`, a worker never imports: every decoder, every charset a
message may name, quarantine and notices run on modules already loaded.

Why it matters: a worker runs after privileges are dropped, and the
interpreter's files may be readable by root only (see amavisd/preload.py);
an import there fails in the middle of a message. The check runs in a fresh
interpreter that loads what `amavisd run` has loaded when it drops root,
calls `preload()`, then puts an import hook first in `sys.meta_path` that
refuses (and records) every import, and takes a set of inputs through the
decoders (each registered decoder must run at least once) and a message
through the whole pipeline, real clamd and SMTP sink included.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from amavisd.testing import archivers
from tests.rigs import codec_messages

REPO = Path(__file__).resolve().parents[2]

HARNESS = r"""
import json, sys
from pathlib import Path

job = json.load(sys.stdin)
# What `amavisd run` (cli.cmd_run) has imported when it drops root.
from amavisd import cli, config as configuration, daemonize, logs, pidfile, privileges
from amavisd.listeners import bind_all
from amavisd.master import Arbiter
from amavisd.envelope import Envelope, Job
from amavisd.decode.engine import decompose
from amavisd.decode.registry import REGISTRY
from amavisd.decode.limits import Limits

cfg = configuration.load(None, job["settings"])
if job["preload"]:
    from amavisd import preload
    preload.preload()

ran = set()
def counted(kind, decoder):
    def run(part, ctx):
        ran.add(kind)
        return decoder(part, ctx)
    return run
for kind, decoder in list(REGISTRY.items()):
    REGISTRY[kind] = counted(kind, decoder)

refused = []
class RefuseImports:
    "What an unreadable interpreter does after the drop: an import that would load code fails."
    def find_spec(self, name, path=None, target=None):
        for finder in sys.meta_path[1:]:  # a name no finder knows fails anyway, as before
            if getattr(finder, "find_spec", None) and finder.find_spec(name, path, target):
                refused.append(name)
                raise ImportError(f"import of {name} after preload")
        return None
sys.meta_path.insert(0, RefuseImports())

# A worker: its pipeline is built after the fork, after the drop.
from amavisd.pipeline import Pipeline
pipeline = Pipeline(cfg, name_types=True)
limits = Limits.from_config(cfg)
for path in job["files"]:
    raw = Path(path).read_bytes()
    decompose(raw, limits, None, use_magic=True, bare_file=not path.endswith(".eml")).cleanup()
verdicts = []
for path in job["messages"]:
    envelope = Envelope(sender="alice@example.test", recipients=["bob@example.test"])
    result = pipeline.process(Job(log_id="t", mail_path=path, envelope=envelope))
    verdicts.append(result.verdict)
    pipeline.send_notices()
print(json.dumps({"refused": sorted(set(refused)), "decoders": sorted(ran),
                  "registered": sorted(REGISTRY), "verdicts": verdicts}))
"""

# Charsets a header or a part may name (a codec is found by importing its
# module), each with a word it can encode.
CHARSETS = {"koi8-r": "Привет", "windows-1251": "Привет", "mac-cyrillic": "Привет",
            "iso-2022-jp": "こんにちは", "shift_jis": "こんにちは", "euc-kr": "안녕하세요",
            "gb2312": "你好", "big5": "你好", "iso-8859-7": "Γειά σου", "tis-620": "สวัสดี",
            "cp850": "Grüße", "utf-7": "Grüße", "utf-16": "Grüße"}


def charset_message() -> bytes:
    """Encoded words (RFC 2047) in the Subject and From, RFC 2231 file names
    and a text part in each of CHARSETS; written out by hand, since the email
    package would re-encode the headers in UTF-8."""
    def word(charset: str, text: str) -> str:
        return f"=?{charset}?b?{base64.b64encode(text.encode(charset)).decode()}?="

    lines = [f"From: {word('windows-1251', 'Алиса')} <alice@example.test>",
             "To: bob@example.test",
             "Subject: " + " ".join(word(charset, text) for charset, text in CHARSETS.items()),
             "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="b"', ""]
    for charset, text in CHARSETS.items():
        name = "".join(f"%{byte:02X}" for byte in f"{text}.txt".encode(charset))
        lines += ["--b", f"Content-Type: text/plain; charset={charset}",
                  f"Content-Disposition: attachment; filename*={charset}''{name}",
                  "Content-Transfer-Encoding: base64", "",
                  base64.b64encode(text.encode(charset)).decode()]
    return ("\n".join(lines + ["--b--", ""])).encode()


def corpus_inputs(corpus: Path) -> list[str]:
    """The smallest samples of every archive folder; every encrypted, corrupt
    and self-extracting sample of reasonable size; the virus test mails."""
    chosen: list[Path] = []
    for folder in sorted((corpus / "archives").iterdir()):
        if folder.name == "bombs" or not folder.is_dir():
            continue
        files = sorted((p for p in folder.rglob("*") if p.is_file()),
                       key=lambda p: (p.stat().st_size, p.name))
        everything = folder.name in ("encrypted", "corrupt", "sfx-exe", "tnef", "iso")
        chosen += [p for p in files if p.stat().st_size < 2_000_000][: None if everything else 3]
    chosen += sorted((corpus / "mail" / "testvirus").glob("*.eml"))
    chosen += sorted(p for p in (corpus / "testvirus").rglob("*") if p.is_file())
    return [str(p) for p in chosen]


def made_inputs(tmp: Path) -> tuple[list[str], list[str]]:
    """Generated files: a zip behind an ELF program and behind a PDF, a mail
    naming many charsets; messages: EICAR behind each codec (codec_messages)."""
    for fmt in ("zip", "iso"):
        if archivers.available(fmt):
            pytest.skip(archivers.available(fmt))
    a_zip = codec_messages.eicar_zip(tmp)
    files = {
        "elf-sfx": Path("/bin/true").read_bytes() + a_zip,
        "pdf-with-zip": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + a_zip,  # sfx.py looks behind
    }
    messages = {f"{name}.eml": data for name, data in codec_messages.messages(tmp).items()}
    messages["banned.eml"] = archivers.as_attachment(b"MsgBox 1", "AnnaKournikova.jpg.vbs")
    messages["charsets.eml"] = charset_message()
    for name, data in (files | messages).items():
        (tmp / name).write_bytes(data)
    return [str(tmp / name) for name in files], [str(tmp / name) for name in messages]


def run_harness(job: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", HARNESS], input=json.dumps(job).encode(),
                          capture_output=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    got = json.loads(proc.stdout.decode().splitlines()[-1])
    got["stderr"] = proc.stderr.decode(errors="replace")[-3000:]
    return got


@pytest.fixture
def job(tmp_path, clamd_nodecomp, sink):
    host, port = sink.address
    settings = {"clamd": clamd_nodecomp.address, "backup_scanners": [],
                "quarantine_dir": str(tmp_path / "q"), "myhostname": "gw.example.test",
                "notify_method": f"smtp:{host}:{port}", "local_domains": ["example.test"],
                # under load one notice once waited 30 s for the sink's reply (open)
                "smtp_timeout": 120.0}
    files, messages = made_inputs(tmp_path)
    return {"settings": settings, "files": files, "messages": messages, "preload": True}


def test_after_preload_no_decoder_imports(job, corpus, sink):
    job["files"] = corpus_inputs(corpus) + job["files"]
    got = run_harness(job)
    assert got["refused"] == []
    assert sorted(set(got["registered"]) - set(got["decoders"])) == []  # every decoder ran
    assert got["verdicts"] == ["INFECTED"] * (len(job["messages"]) - 2) + ["BANNED", "CLEAN"]
    # An admin notice each (smtplib: idna) went out through the real sink.
    # Under a loaded CI twice one of them, not the first, waited out its 120 s
    # for the sink's greeting (the sink is a thread of this process): a
    # notice that did not arrive must have failed on the network, never on
    # an import, which would also be in `refused`.
    blocked = len(job["messages"]) - 1
    arrived = sink.wait(blocked, timeout=30)
    assert arrived and {tuple(m.rcpt_tos) for m in arrived} == {("virusalert@example.test",)}
    failed = got["stderr"].count("admin notification to virusalert@example.test failed")
    assert len(arrived) + failed == blocked, got["stderr"]
    assert "import" not in got["stderr"].lower(), got["stderr"]


def test_without_preload_the_harness_sees_lazy_imports(job):
    """The control: the hook catches what a dropped worker would fail on."""
    job["preload"] = False
    got = run_harness(job)
    # zip names, Joliet names, the TNEF reader (textual.py imports it on use), smtplib
    lazy = {"encodings.cp437", "encodings.utf_16_be", "amavisd.decode.tnef", "encodings.idna"}
    assert lazy <= set(got["refused"]), got
    assert got["verdicts"] == ["UNCHECKED"] * (len(job["messages"]) - 2) + ["BANNED", "CLEAN"]
