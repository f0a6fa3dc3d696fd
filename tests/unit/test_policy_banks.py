"""Policy banks without a scanner: the [policy_banks.NAME] tables and their
checks at load, how banks are chosen for a message (listener, MYNETS, the
client's names; amavisd-new's order), the overlay, the cache the pipeline
keeps, and what banks change downstream: notices for originating mail, the
X-Virus-Scanned header, the log line.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from amavisd.actions.headers import header_edits
from amavisd.actions.notify import Notifier, NotifySettings
from amavisd.config import ConfigError, load
from amavisd.envelope import Envelope, Job
from amavisd.pipeline import log_result
from amavisd.policies import MAX_POLICIES, Policies
from amavisd.policy.banks import MAX_BANKS, Banks, Networks, client_ip, listener_keys
from amavisd.verdict import Category, Destiny, Result

BANKS_TOML = """
[daemon]
interface_policy = ["SOCK=AM.PDP-SOCK", "10026=ORIGINATING", "127.0.0.1:9998=TCP"]

[policy]
quarantine_dir = ""

[policy_banks."AM.PDP-SOCK"]
auth_required_release = false

[policy_banks.STRICT]
banned_destiny = "reject"
virus_destiny = "reject"
x_header_line = "strictly by {myhostname}"

[policy_banks.LENIENT]
banned_destiny = "pass"

[policy_banks.TCP]
mynetworks = ["192.0.2.0/24"]

[policy_banks.MYNETS]
notify_from = "filter@example.org"
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "amavisd.toml"
    path.write_text(BANKS_TOML)
    return path


@pytest.fixture
def policies(config_path: Path) -> Policies:
    return Policies(load(str(config_path)))


def job(client: str = "", banks: str = "", door: tuple[str, ...] = ()) -> Job:
    return Job(log_id="t-1", mail_path="/nonexistent",
               envelope=Envelope(sender="a@example.org", recipients=["b@example.net"],
                                 client_address=client, policy_bank=banks),
               interface_banks=door)


# -- the tables, checked at load ------------------------------------------------------------

def test_bank_tables_load_with_each_value_checked_by_its_row(config_path):
    cfg = load(str(config_path))
    assert cfg.policy_banks["STRICT"]["banned_destiny"] == "reject"
    assert cfg.policy_banks["AM.PDP-SOCK"] == {"auth_required_release": False}
    assert load(None).policy_banks == {}


@pytest.mark.parametrize("table, said", [
    ('[policy_banks.STRICT]\nbaned_destiny = "reject"\n',
     r"policy_banks\.STRICT: unknown key 'baned_destiny'"),
    ("[policy_banks.STRICT]\nworkers = 4\n", r"policy_banks\.STRICT: unknown key 'workers'"),
    ('[policy_banks.STRICT]\nvirus_destiny = "later"\n',
     r"policy_banks\.STRICT\.virus_destiny: must be one of"),
    ("[policy_banks.STRICT]\nquarantine = 3\n",
     r"policy_banks\.STRICT\.quarantine: expected list"),
    ('[policy_banks."bad name"]\n', r"policy_banks\.bad name: bad policy bank name"),
    ("[policy_banks]\nSTRICT = 3\n", r"policy_banks\.STRICT: must be a table"),
    ('[daemon]\ninterface_policy = ["10026=NOPE"]\n',
     r"daemon\.interface_policy: no policy bank named 'NOPE'"),
    ('[policy]\nrecipient_policy = ["example.org=NOPE"]\n',
     r"policy\.recipient_policy: no policy bank named 'NOPE'"),
    ('[policy_banks.A]\nrecipient_policy = ["example.org=NOPE"]\n',
     r"policy_banks\.A\.recipient_policy: no policy bank named 'NOPE'"),
    ('[daemon]\ninterface_policy = ["70000=ORIGINATING"]\n', r"bad port"),
    ('[daemon]\ninterface_policy = ["ORIGINATING"]\n', r"use SOCK\|PORT"),
    ('[policy]\nmynetworks = ["10.0.0.0/33"]\n', r"policy\.mynetworks: '10\.0\.0\.0/33'"),
])
def test_a_bad_bank_is_one_line_naming_bank_and_key(tmp_path, table, said):
    path = tmp_path / "bad.toml"
    path.write_text(table)
    with pytest.raises(ConfigError, match=said) as err:
        load(str(path))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_networks_and_doors_are_normalised():
    cfg = load(None, {"mynetworks": ["[::1]", "[fe80::]/10", "!10.1.0.0/16", "10.0.0.1/8"],
                      "interface_policy": ["[::1]:9998=MYNETS", "0010026=ORIGINATING",
                                           "/run/a.sock=MYNETS"]})
    assert cfg.mynetworks == ["::1/128", "fe80::/10", "!10.1.0.0/16", "10.0.0.0/8"]
    assert cfg.interface_policy == ["[::1]:9998=MYNETS", "10026=ORIGINATING",
                                    "/run/a.sock=MYNETS"]


# -- choosing -------------------------------------------------------------------------------

def test_networks_first_match_wins_and_strange_addresses_are_never_ours():
    nets = Networks(load(None, {"mynetworks": ["!10.1.0.0/16", "10.0.0.0/8", "::1"]}).mynetworks)
    assert "10.2.3.4" in nets and "10.1.2.3" not in nets
    assert "[::1]" in nets and "IPv6:::1" in nets and "::ffff:10.2.3.4" in nets
    for stranger in ["192.0.2.1", "", "unknown", "10.2.3.4.5", "[10.2.3.4", "::2", "\x00"]:
        assert stranger not in nets
    assert client_ip("fe80::1%eth0") is not None
    default = Networks(load(None).mynetworks)  # amavisd-new's @mynetworks
    assert all(a in default for a in ["127.0.0.1", "192.168.1.1", "172.16.0.1", "::1",
                                      "fe80::1", "fd00::1", "169.254.1.1"])
    assert "8.8.8.8" not in default and "100.64.0.1" not in default


def test_banks_apply_listener_then_mynets_then_the_clients_names(policies):
    assert policies.for_job(job()).banks == ()
    assert policies.for_job(job("192.0.2.7")).banks == ()
    assert policies.for_job(job("10.0.0.7")).banks == ("MYNETS",)
    assert policies.for_job(job("10.0.0.7", "STRICT, LENIENT", ("AM.PDP-SOCK",))).banks == (
        "AM.PDP-SOCK", "MYNETS", "STRICT", "LENIENT")
    # a listener's bank may say which networks are ours (amavisd-new loads it first)
    assert policies.for_job(job("192.0.2.7", door=("TCP",))).banks == ("TCP", "MYNETS")
    assert policies.for_job(job("10.0.0.7", door=("TCP",))).banks == ("TCP",)


def test_later_banks_win_key_by_key(policies):
    both = policies.for_job(job(banks="STRICT,LENIENT")).config
    assert (both.banned_destiny, both.virus_destiny) == ("pass", "reject")
    assert policies.for_job(job(banks="LENIENT,STRICT")).config.banned_destiny == "reject"
    base = policies.base.config
    assert (base.banned_destiny, base.virus_destiny) == ("discard", "discard")  # untouched


def test_builtin_banks_make_mail_originating_and_a_site_table_adds_to_them(policies):
    assert not policies.base.originating
    mynets = policies.for_job(job("127.0.0.1"))
    assert mynets.originating and mynets.config.notify_from == "filter@example.org"
    assert policies.for_job(job(banks="ORIGINATING")).originating
    assert load(None, {"originating": True}).originating  # a submission-only daemon


def test_unknown_names_from_a_client_are_logged_once_and_ignored(policies, caplog):
    caplog.set_level(logging.INFO, "amavisd.banks")
    for _ in range(3):
        assert policies.for_job(job(banks="NOPE,STRICT,../x")).banks == ("STRICT",)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert said == ["(t-1) policy bank NOPE does not exist, ignored",
                    "(t-1) policy bank '../x' does not exist, ignored"]


def test_a_bank_right_after_itself_is_skipped_and_names_are_bounded(policies):
    assert policies.for_job(job(banks="STRICT,STRICT,LENIENT,STRICT")).banks == (
        "STRICT", "LENIENT", "STRICT")
    many = ",".join(["STRICT", "LENIENT"] * 100)
    assert len(policies.for_job(job(banks=many)).banks) == MAX_BANKS


def test_listener_keys_are_amavisd_news(tmp_path):
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "s.sock"))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    try:
        assert listener_keys(unix) == ("SOCK", str(tmp_path / "s.sock"))
        assert listener_keys(tcp) == (str(port), f"127.0.0.1:{port}")
        banks = Banks(load(None, {"interface_policy": [f"{port}=ORIGINATING",
                                                       f"127.0.0.1:{port}=MYNETS"]}))
        assert banks.for_listener(listener_keys(tcp)) == ("ORIGINATING", "MYNETS")
        assert banks.for_listener(listener_keys(unix)) == ()
    finally:
        unix.close()
        tcp.close()
    try:
        six = socket.socket(socket.AF_INET6)
        six.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with six:
        assert listener_keys(six)[1] == f"[::1]:{six.getsockname()[1]}"


# -- the cache the pipeline keeps ---------------------------------------------------------

def test_a_combination_is_built_once_and_the_cache_is_bounded(policies, monkeypatch):
    built = []
    original = Policies._build
    monkeypatch.setattr(Policies, "_build", lambda self, names: built.append(names)
                        or original(self, names))
    first = policies.for_job(job("10.0.0.7", "STRICT"))
    for _ in range(1000):
        assert policies.for_job(job("10.0.0.7", "STRICT")) is first
        assert policies.for_job(job()) is policies.base
    assert built == [("MYNETS", "STRICT")]
    strict, lenient = policies.get(["STRICT"]), policies.get(["LENIENT"])
    assert strict.notifier.transport is lenient.notifier.transport  # shared pieces
    for n in range(MAX_POLICIES + 50):
        policies.get(["STRICT", "LENIENT"] * (n % 7 + 1) + ["MYNETS"] * (n // 7))
    assert len(policies._cache) <= MAX_POLICIES


def test_a_bank_with_its_own_quarantine_gets_its_own_store(tmp_path):
    cfg = load(None, {"quarantine_dir": str(tmp_path / "q"),
                      "policy_banks": {"ELSEWHERE": {"quarantine_dir": str(tmp_path / "q2")},
                                       "SAME": {"banned_destiny": "reject"}}})
    policies = Policies(cfg)
    assert policies.get(["SAME"]).quarantine is policies.base.quarantine
    assert policies.get(["ELSEWHERE"]).quarantine.location.endswith("q2")


def test_recipient_banks_and_bypasses(tmp_path):
    cfg = load(None, {"quarantine_dir": "",
                      "recipient_policy": ["example.org=STRICT", ".example.net=LENIENT"],
                      "bypass_virus_checks": [".example.net"],
                      "policy_banks": {"STRICT": {"virus_destiny": "reject"},
                                       "LENIENT": {"bypass_banned_checks": [".example.net"]}}})
    policies = Policies(cfg)
    checks = policies.recipient_checks(policies.base, ["a@example.org", "b@sub.example.net",
                                                       "c@example.com"])
    assert [c.policy.banks for c in checks] == [("STRICT",), ("LENIENT",), ()]
    assert [(c.bypass_virus, c.bypass_banned) for c in checks] == [
        (False, False), (True, True), (False, False)]
    [anonymous] = policies.recipient_checks(policies.base, [])
    assert anonymous.address is None and anonymous.policy is policies.base


# -- what banks change downstream --------------------------------------------------------

def banned(destiny: Destiny) -> Result:
    return Result(log_id="1-01", category=Category.BANNED, destiny=destiny,
                  banned=["'a.exe' (p002) by rule [deny type = exe]"])


def sender_notices(envelope: Envelope, destiny: Destiny = Destiny.DISCARD, **settings):
    chosen = NotifySettings(myhostname="gw.example.org", local_domains=["example.org"],
                            **settings)
    notices = Notifier(chosen, None).build(banned(destiny), envelope, b"Subject: s\n\nx\n")
    return [n.recipients for n in notices if n.role == "sender"]


def test_a_local_sender_of_originating_mail_is_told_of_a_discard_strangers_never():
    ours = Envelope(sender="<alice@example.org>", recipients=["x@remote.example"])
    stranger = Envelope(sender="<eve@remote.example>", recipients=["bob@example.org"])
    assert sender_notices(ours, originating=True) == [["alice@example.org"]]
    assert sender_notices(ours) == []  # inbound rules: a discard is silent
    assert sender_notices(stranger) == []
    # originating by IP includes a stranger's mail forwarded through us: no backscatter,
    # even where remote senders get bounces
    assert sender_notices(stranger, originating=True, sender_notify_remote=True) == []
    assert sender_notices(ours, Destiny.REJECT, originating=True) == []  # the MTA says it
    assert sender_notices(Envelope(sender="<>"), originating=True) == []


def test_no_x_virus_scanned_on_mail_nobody_had_scanned(policies):
    config = policies.get(["STRICT"]).config
    result = Result(log_id="1-01", category=Category.CLEAN, destiny=Destiny.PASS)
    [scanned] = header_edits(config, result)
    assert (scanned.name, scanned.value) == ("X-Virus-Scanned",
                                             f"strictly by {config.hostname}")
    result.bypassed_virus_checks = True
    assert header_edits(config, result) == []


def test_the_log_line_names_the_banks_and_local_mail_as_amavisd_new_does(caplog):
    caplog.set_level(logging.INFO, "amavisd.pipeline")
    result = Result(log_id="1-01", category=Category.CLEAN, destiny=Destiny.PASS,
                    policy_banks=("MYNETS", "STRICT"), originating=True)
    log_result(job("10.0.0.7"), result)
    assert "Passed CLEAN {pass}, MYNETS/STRICT LOCAL [10.0.0.7] <a@example.org> -> " \
           "<b@example.net>" in caplog.text


def test_a_bank_whose_store_cannot_open_fails_when_the_pipeline_is_built():
    cfg = load(None, {"quarantine_dir": "",
                      "policy_banks": {"ODD": {"quarantine_store": "nosuch:/x"}}})
    with pytest.raises(ConfigError, match=r"^policy_banks\.ODD: quarantine_store: "):
        Policies(cfg)
