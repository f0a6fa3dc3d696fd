"""`amavisd import-config`: amavisd-new's Perl configuration read without Perl
and translated into TOML that amavisd's own loader accepts."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from amavisd import cli
from amavisd.config import load
from amavisd.migrate.evaluate import TOO_LONG, Reader
from amavisd.migrate.importer import import_config
from amavisd.migrate.lexer import PerlSyntaxError
from amavisd.migrate.perlre import RegexNotTranslated, to_python
from amavisd.migrate.render import render
from amavisd.migrate.scope import Entry, Translation
from amavisd.migrate.values import ArrayRef, HashRef, Regex, RegexTable, VarRef


def read(tmp_path: Path, text: str, name: str = "50-user") -> Reader:
    path = tmp_path / name
    path.write_text(text)
    reader = Reader()
    reader.read_path(str(path))
    return reader


def imported(tmp_path: Path, text: str, **kw) -> tuple[dict, str]:
    """The translated TOML of one file, parsed, and the text itself; the text
    must load with amavisd's own loader."""
    conf = tmp_path / "conf.d"
    conf.mkdir(exist_ok=True)
    (conf / "50-user").write_text(text)
    result = import_config([str(conf)], **kw)
    assert result.load_error == ""
    out = tmp_path / "out.toml"
    out.write_text(result.text)
    load(str(out))
    return tomllib.loads(result.text), result.text


def not_translated(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("# not translated: ")]


# -- reading Perl ------------------------------------------------------------------------


def test_scalars_strings_numbers_and_interpolation(tmp_path):
    v = read(tmp_path, r"""use strict;
$MYHOME = '/srv/amavis';   # a comment
$TEMPBASE = "$MYHOME/tmp";
$QUARANTINEDIR = "${MYHOME}/virusmails";
$MAX_EXPANSION_QUOTA = 300*1024*1024;
$n = 1_000; $hex = 0x1F; $mode = 0660; $f = 2.5;
$admin = "postmaster\@example.com";
$single = 'it\'s \n not an escape';
$q = q{a {nested} b}; $qq = qq(tab\there);
$ENV{PATH} = $path = '/usr/bin';
$x = 'a' . 'b' . 1;
1;  # the file's value
""").vars
    s = v.scalars
    assert s["TEMPBASE"] == "/srv/amavis/tmp"
    assert s["QUARANTINEDIR"] == "/srv/amavis/virusmails"
    assert s["MAX_EXPANSION_QUOTA"] == 300 * 1024 * 1024
    assert (s["n"], s["hex"], s["mode"], s["f"]) == (1000, 31, 0o660, 2.5)
    assert s["admin"] == "postmaster@example.com"
    assert s["single"] == "it's \\n not an escape"
    assert (s["q"], s["qq"]) == ("a {nested} b", "tab\there")
    assert s["path"] == "/usr/bin" and v.hashes["ENV"] == {"PATH": "/usr/bin"}
    assert s["x"] == "ab1"
    assert v.where("$TEMPBASE") == f"{tmp_path}/50-user:3"


def test_lists_hashes_refs_and_regex_tables(tmp_path):
    v = read(tmp_path, r"""
@mynetworks = qw( 127.0.0.0/8 [::1] );
@bypass_virus_checks_maps = (\%bypass_virus_checks, ['.example.com'], \$x_re);
%h = (a => 1, 'b', 2);
$interface_policy{'10026'} = 'ORIGINATING';
$policy_bank{'MYNETS'} = { originating => 1, bypass_banned_checks_maps => [1], };
$policy_bank{'X'}{'final_virus_destiny'} = D_REJECT;
$banned_filename_re = new_RE( [qr'^UNDECIPHERABLE$' => 0], qr'.\.(exe|com)$'i );
push @mynetworks, '10.0.0.0/8';
@range = (1..3);
""").vars
    assert v.arrays["mynetworks"] == ["127.0.0.0/8", "[::1]", "10.0.0.0/8"]
    assert v.arrays["bypass_virus_checks_maps"][0] == VarRef("%", "bypass_virus_checks")
    assert v.arrays["bypass_virus_checks_maps"][1] == ArrayRef([".example.com"])
    assert v.hashes["h"] == {"a": 1, "b": 2}
    assert v.hashes["interface_policy"] == {"10026": "ORIGINATING"}
    bank = v.hashes["policy_bank"]["MYNETS"]
    assert isinstance(bank, HashRef) and bank.items["originating"] == 1
    assert v.hashes["policy_bank"]["X"].items["final_virus_destiny"].name == "D_REJECT"
    table = v.scalars["banned_filename_re"]
    assert isinstance(table, RegexTable)
    assert table.entries == [(Regex("^UNDECIPHERABLE$", ""), 0), (Regex(r".\.(exe|com)$", "i"), 1)]
    assert v.arrays["range"] == [1, 2, 3]


def test_a_backtick_is_never_run_and_debians_head_idiom_reads_the_file(tmp_path):
    mailname = tmp_path / "mailname"
    mailname.write_text("example.org\nsecond line\n")
    marker = tmp_path / "ran"
    v = read(tmp_path, f"""
chomp($mydomain = `head -n 1 {mailname}`);
$x = `touch {marker}`;
$y = qx(touch {marker});
system('touch {marker}');
""").vars
    assert v.scalars["mydomain"] == "example.org"
    assert v.scalars["x"].command == f"touch {marker}"
    assert not marker.exists()


def test_a_statement_that_is_not_a_setting_is_reported_and_reading_goes_on(tmp_path):
    reader = read(tmp_path, """$a = 1;
if ($a) { $max_servers = 9; } else { $b = 2; }
sub helper { return 1 }
$max_servers = 3;
""")
    assert reader.vars.scalars["max_servers"] == 3
    assert [(u.where, u.reason) for u in reader.unread] == [
        (f"{tmp_path}/50-user:2", "an if statement (code, not a setting)"),
        (f"{tmp_path}/50-user:3", "a sub statement (code, not a setting)")]


@pytest.mark.parametrize("text, line, message", [
    ("$a = 1;\n$b = 'never closed;\n", 2, "unterminated string"),
    ("$a = 1;\n\n$x = <<EOF;\nhere\nEOF\n", 3, "here-documents"),
    ("(" * 100 + "1", 1, "nested deeper"),
    ("$x = 2" + "**2" * 300 + ";", 1, "nested deeper"),
    ("$x = ${ \\ 'a' };", 1, "dereference blocks"),
])
def test_what_cannot_be_read_is_one_error_naming_file_and_line(tmp_path, text, line, message):
    with pytest.raises(PerlSyntaxError) as err:
        read(tmp_path, text)
    assert str(err.value).startswith(f"{tmp_path}/50-user:{line}: ")
    assert message in str(err.value)


def test_values_are_bounded(tmp_path):
    v = read(tmp_path, "$a = 'x' x 1;" + "$s = 'aaaaaaaa';" + '$s = "$s$s";' * 40 +
             "@l = (1, 2);" + "@l = (@l, @l);" * 40 + "@r = (1..100000000);").vars
    assert "longer than" in v.scalars["s"].reason
    assert v.arrays["l"] == [TOO_LONG]
    assert "range" in v.arrays["r"][0].reason


def test_a_long_chain_of_operators_is_skipped_not_a_traceback(tmp_path):
    """`1+1+...` and `$h{a}{b}...` nest to the left, where no bracket
    counts: without a bound the evaluator's recursion broke (RecursionError)."""
    reader = read(tmp_path, "$max_servers = " + "+".join(["1"] * 5000) + ";\n"
                  "$child_timeout = " + " . ".join(["'ab'"] * 5000) + ";\n"
                  "$log_level = " + "(" * 12 + "+".join(["1"] * 190) + ")" * 12 + "+1" * 9
                  + ";\n$sa_tag_level_deflt = 1 + 2;\n"
                  "$max_requests = $h" + "{a}" * 5000 + ";\n"
                  "$child_timeout = $r" + "->[0]" * 5000 + ";\n")
    bounded = [u.where.rpartition(":")[2] for u in reader.unread
               if u.reason == "more than 200 operators or subscripts in one statement"]
    assert bounded == ["1", "2", "5", "6"]
    assert reader.vars.scalars["log_level"] == 199  # 199 operators: still read
    assert reader.vars.scalars["sa_tag_level_deflt"] == 3


def test_files_are_read_in_run_parts_order_and_odd_names_are_skipped(tmp_path):
    conf = tmp_path / "conf.d"
    conf.mkdir()
    (conf / "20-b").write_text("$max_servers = 4;\n")
    (conf / "10-a").write_text("$max_servers = 3;\n")
    (conf / "50-user.dpkg-old").write_text("$max_servers = 99;\n")
    result = import_config([str(conf)])
    assert tomllib.loads(result.text)["daemon"]["workers"] == 4
    assert f"# not translated: {conf}/50-user.dpkg-old:0: the whole file: run-parts skips" \
        in result.text


# -- translating -----------------------------------------------------------------------

SITE = r"""use strict;
$max_servers = 6;
$mydomain = 'example.org';
$MYHOME = '/srv/amavis';
$TEMPBASE = "$MYHOME/tmp";
$daemon_user = 'amavis'; $daemon_group = 'amavis';
@local_domains_maps = ( [".$mydomain", 'example.com'] );
$virus_admin = "virusalert\@$mydomain";
$QUARANTINEDIR = "$MYHOME/quarantine";
$final_virus_destiny = D_REJECT;
$final_banned_destiny = D_BOUNCE;
$final_unchecked_destiny = D_TEMPFAIL;
$final_spam_destiny = D_PASS;
@mynetworks = qw( 127.0.0.0/8 [::1] 192.0.2.0/24 !192.0.2.7 );
$unix_socketname = "$MYHOME/amavisd.sock";
$inet_socket_port = [10024, 10026];
$interface_policy{'SOCK'} = 'AM.PDP-SOCK';
$interface_policy{'10026'} = 'ORIGINATING';
$policy_bank{'AM.PDP-SOCK'} = { protocol => 'AM.PDP', auth_required_release => 0 };
$policy_bank{'ORIGINATING'} = {
  originating => 1,
  final_banned_destiny => D_REJECT,
  bypass_banned_checks_maps => [1],
  virus_admin => 'outbound@example.org',
  max_servers => 3,
};
@bypass_virus_checks_maps = ( ['trusted@example.com', '.lab.example.com', '!x.lab.example.com'] );
%bypass_banned_checks = ( 'postmaster@example.org' => 1 );
$banned_filename_re = new_RE(
  [ qr'^UNDECIPHERABLE$' => 0 ],
  [ qr'^\.(Z|gz|bz2)$' => 0 ],
  qr'.\.(exe|vbs|pif|scr|bat|cmd|com|cpl)$'i,
  [ qr'\.txt$' => 0 ],
  qr'^\.(exe-ms|dll|wmf)$',
  qr'^application/x-msdownload$'i,
  qr'\.exe$',
  qr'[[:cntrl:]]',
);
@av_scanners = (
  ['ClamAV-clamd', \&ask_daemon, ["CONTSCAN {}\n", "/run/clamav/clamd.ctl"],
    qr/\bOK$/m, qr/\bFOUND$/m, qr/^.*?: (?!Infected Archive)(.*) FOUND$/m ],
  ['Some daemon', \&ask_daemon, ["SCAN {}\n", '127.0.0.1:8127'], qr/^OK/m, qr/^FOUND: /m ],
);
@av_scanners_backup = (
  ['ClamAV-clamscan', 'clamscan', "--stdout --no-summary -r {}", [0], qr/:.*\sFOUND$/m,
    qr/^.*?: (?!Infected Archive)(.*) FOUND$/m ],
);
$sa_tag_level_deflt = 2.0;
$sql_select_policy = 'SELECT 1';
1;
"""


@pytest.fixture
def site(tmp_path):
    return imported(tmp_path, SITE)


def test_a_sites_settings_are_translated(site, tmp_path):
    doc, _ = site
    assert doc["daemon"]["workers"] == 6
    assert doc["daemon"]["workdir"] == "/srv/amavis"
    assert doc["daemon"]["tempbase"] == "/srv/amavis/tmp"
    assert (doc["daemon"]["user"], doc["daemon"]["group"]) == ("amavis", "amavis")
    assert doc["daemon"]["socket"] == "/srv/amavis/amavisd.sock"
    assert doc["notify"]["local_domains"] == [".example.org", "example.com"]
    assert doc["notify"]["admin"] == "virusalert@example.org"
    assert doc["notify"]["admin_notify"] == ["infected", "banned", "unchecked"]
    assert doc["policy"]["quarantine_dir"] == "/srv/amavis/quarantine"
    assert (doc["policy"]["virus_destiny"], doc["policy"]["banned_destiny"],
            doc["policy"]["unchecked_destiny"]) == ("reject", "bounce", "tempfail")
    assert doc["policy"]["mynetworks"] == ["127.0.0.0/8", "::1/128", "192.0.2.0/24",
                                           "!192.0.2.7/32"]
    assert doc["policy"]["bypass_virus_checks"] == ["trusted@example.com", ".lab.example.com",
                                                    "!x.lab.example.com"]
    assert doc["policy"]["bypass_banned_checks"] == ["postmaster@example.org"]
    assert doc["scan"]["clamd"] == "unix:/run/clamav/clamd.ctl"
    assert doc["scan"]["primary_scanners"] == ["clamd"]
    assert doc["scan"]["backup_scanners"] == ["clamscan"]
    assert doc["smtp"]["smtp_listen"] == ["127.0.0.1:10024", "127.0.0.1:10026"]
    assert doc["daemon"]["interface_policy"] == ["SOCK=AM.PDP-SOCK", "10026=ORIGINATING"]


def test_banned_filename_re_becomes_banned_rules_in_order(site):
    doc, _ = site
    assert doc["policy"]["banned_rules"] == [
        r"deny name ~ .\.(exe|vbs|pif|scr|bat|cmd|com|cpl)$",
        r"allow name ~ (?-i:\.txt$)",
        "deny type = exe",
        "deny mime ~ ^application/x-msdownload$",
        r"deny name ~ \.exe$",
        "deny type = elf",  # \.exe$ also matched amavisd-new's '.exe' (any executable)
    ]


def test_policy_banks_keep_the_keys_that_map(site):
    doc, _ = site
    banks = doc["policy_banks"]
    assert banks["AM.PDP-SOCK"] == {}
    assert banks["ORIGINATING"] == {"originating": True, "banned_destiny": "reject",
                                    "bypass_banned_checks": ["."],
                                    "admin": "outbound@example.org",
                                    "admin_notify": ["infected", "banned", "unchecked"]}


def test_each_untranslatable_line_is_reported_with_file_and_line(site, tmp_path):
    _, text = site
    user = f"{tmp_path}/conf.d/50-user"
    lines = not_translated(text)
    expected = {
        13: "$final_spam_destiny: no spam checks",
        19: "$auth_required_release (policy bank AM.PDP-SOCK): 0 released quarantined mail",
        20: "$max_servers (policy bank ORIGINATING): workers is a daemon-wide setting",
        30: "$banned_filename_re: qr'^UNDECIPHERABLE$': an undecipherable part is UNCHECKED",
        31: r"$banned_filename_re: qr'^\.(Z|gz|bz2)$': an allow on a container's type",
        34: "amavisd detects no type like file(1)'s 'wmf'",
        37: "$banned_filename_re: qr'[[:cntrl:]]': a POSIX class",
        42: "@av_scanners: 'Some daemon': a daemon protocol amavisd does not speak",
        48: "$sa_tag_level_deflt: no spam checks",
        49: "$sql_select_policy: no SQL",
    }
    for line, words in expected.items():
        assert any(entry.startswith(f"# not translated: {user}:{line}: ") and words in entry
                   for entry in lines), (line, words, lines)


@pytest.mark.parametrize("setting, words", [
    ("$final_unchecked_destiny = D_PASS;", "would deliver mail amavisd could not fully check"),
    ("@bypass_virus_checks_maps = (1);", "virus checks are off for every recipient"),
    ("$virus_scanners_failure_is_fatal = 0;", "amavisd tempfails it"),
    ("$auth_required_release = 0;", "without its secret_id"),
])
def test_settings_that_would_pass_unchecked_mail_are_never_carried_over(tmp_path, setting,
                                                                        words):
    doc, text = imported(tmp_path, setting)
    assert all(key not in doc.get("policy", {}) for key in
               ("unchecked_destiny", "bypass_virus_checks"))
    assert "auth_required_release" not in doc.get("notify", {})
    assert "when_scanners_fail" not in doc.get("scan", {})
    assert any(words in line for line in not_translated(text)), text


def test_debian_style_listener_banks_and_amavis_tcp_port(tmp_path):
    doc, _ = imported(tmp_path, """
$inet_socket_port = [10024, 9998];
$interface_policy{'9998'} = 'AMPDP';
$policy_bank{'AMPDP'} = { protocol => 'AM.PDP' };
@inet_acl = qw( 127.0.0.1 [::1] );
""")
    assert doc["daemon"]["tcp_listen"] == "127.0.0.1:9998"
    assert doc["smtp"]["smtp_listen"] == ["127.0.0.1:10024"]
    assert doc["smtp"]["smtp_allow"] == ["127.0.0.1", "::1"]


def test_a_temp_base_holding_the_work_base_is_commented_out_so_the_file_loads(tmp_path):
    doc, text = imported(tmp_path, "$MYHOME = '/srv/a'; $TEMPBASE = $MYHOME;\n")
    assert "tempbase" not in doc["daemon"] and doc["daemon"]["workdir"] == "/srv/a"
    assert '# tempbase = "/srv/a"' in text
    assert any("work_base" in line and "$TEMPBASE" in line for line in not_translated(text))


def test_methods_pipe_and_header_line(tmp_path):
    doc, _ = imported(tmp_path, r"""
$notify_method = 'pipe:flags=q argv=/usr/sbin/sendmail -i -f ${sender} -- ${recipient}';
$forward_method = 'smtp:[127.0.0.1]:10025';
$X_HEADER_TAG = 'X-Scanned';
$X_HEADER_LINE = "scanned {by} us";
$mailfrom_notify_admin = 'virusalert@example.org';
""")
    assert doc["notify"]["notify_method"] == \
        "pipe:/usr/sbin/sendmail -i -f {sender} -- {recipients}"
    assert doc["smtp"]["forward_method"] == "smtp:[127.0.0.1]:10025"
    assert doc["headers"]["x_header_tag"] == "X-Scanned"
    assert doc["headers"]["x_header_line"] == "scanned {{by}} us"  # .format() reads it back
    assert doc["notify"]["notify_from"] == "virusalert@example.org"


def test_a_define_stands_for_a_command_the_files_run(tmp_path):
    doc, _ = imported(tmp_path, """chomp($mydomain = `head -n 1 /nonexistent/mailname`);
@local_domains_acl = ( ".$mydomain" );
$virus_admin = "postmaster\\@$mydomain";
""", defines={"mydomain": "example.net"})
    assert doc["notify"]["local_domains"] == [".example.net"]
    assert doc["notify"]["admin"] == "postmaster@example.net"


def test_a_hostile_value_can_neither_break_the_toml_nor_add_a_line(tmp_path):
    doc, text = imported(tmp_path, r"""
$QUARANTINEDIR = "/x\n[daemon]\nworkers = 99";
$myhostname = "a\x00b";
$interface_policy{"9\n[x]"} = 'B';
$X_HEADER_TAG = "X-A\r\nBcc: evil@example.com";
$virus_admin = "a\"b\\c\x{2028}";
$policy_bank{"E\nvil"} = { originating => 1 };
$weird_var_that_we_do_not_know = "line\nbreak";
""")
    assert doc.get("daemon", {}).get("workers") is None
    assert "quarantine_dir" not in doc.get("policy", {})
    assert "x_header_tag" not in doc.get("headers", {})
    assert doc["notify"]["admin"] == "a\"b\\c\u2028"
    for line in text.splitlines():  # every line is a comment, a header, or a key we wrote
        assert not line or line.startswith(("#", "[", " ")) or line.split(" = ")[0] in \
            ("admin", "admin_notify", "originating")


def test_a_setting_this_amavisd_lacks_is_written_commented_out():
    out = Translation()
    out.settings["future_setting"] = Entry(["x"], "f:1", "$future")
    text, verdicts = render(out, {"future_setting": "future"}, ["f"])
    assert "# [future]  (not yet a section of this amavisd)" in text
    assert '# future_setting = ["x"]' in text
    assert tomllib.loads(text) == {}


@pytest.mark.parametrize("pattern, flags, case, expected", [
    (r".\.(exe|scr)$", "i", "broaden", r".\.(exe|scr)$"),
    (r"\.txt$", "", "insensitive-ok", r"(?-i:\.txt$)"),
    (r"\.txt$", "i", "given", r"(?i:\.txt$)"),
    (r"^foo\z", "", "broaden", r"^foo\Z"),
    ("a b # comment\n c", "x", "broaden", "abc"),
    (r"(?<n>x)\x{263A}", "", "broaden", r"(?P<n>x)\U0000263a"),
    (r"[]a ]", "", "broaden", r"[]a ]"),
])
def test_perl_regexes_in_python(pattern, flags, case, expected):
    assert to_python(Regex(pattern, flags), case=case) == expected


@pytest.mark.parametrize("pattern", [r"\G", r"a\Kb", r"(?{ system('x') })", r"\p{L}",
                                     "[[:alpha:]]", r"(?|a)", r"\Qx\E", "a(?i)b", "(", "x{2,1}"])
def test_perl_regexes_python_cannot_say_are_refused(pattern):
    with pytest.raises(RegexNotTranslated):
        to_python(Regex(pattern, ""), case="broaden")


def test_cli_exit_statuses(tmp_path, capsys):
    good = tmp_path / "amavisd.conf"
    good.write_text("$max_servers = 3;\n")
    assert cli.main(["import-config", str(good)]) == 0
    assert "workers = 3" in capsys.readouterr().out
    assert cli.main(["import-config", str(tmp_path / "missing")]) == 66
    bad = tmp_path / "bad.conf"
    bad.write_text("$x = 'unterminated;\n")
    assert cli.main(["import-config", str(bad)]) == 65
    assert f"{bad}:1: unterminated" in capsys.readouterr().err
    assert cli.main(["import-config", "-D", "no equals", str(good)]) == 64


def test_a_fifo_named_by_a_config_does_not_hang_it(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    v = read(tmp_path, f"@local_domains_maps = ( read_hash('{fifo}') );"
                       f"$d = `head -n 1 {fifo}`;").vars
    assert "cannot be read" in v.arrays["local_domains_maps"][0].reason
    assert "cannot be read" in v.scalars["d"].reason


def test_a_hostile_file_cannot_make_a_large_value_or_use_much_memory(tmp_path):
    import tracemalloc

    lines = ["$a = 'aaaaaaaaaaaaaaaa';"] + ['$a = "$a$a";'] * 12  # 64 KiB
    lines += ["@local_domains_acl = (" + ", ".join(["$a"] * 3000) + ");",
              '$b = "' + "$a" * 3000 + '";',
              "@l = (" + ", ".join(["$a"] * 3000) + ");", '$c = "@l";']
    (tmp_path / "big.conf").write_text("\n".join(lines))
    tracemalloc.start()
    try:
        result = import_config([str(tmp_path / "big.conf")])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 1024 * 1024, peak  # 3000 copies of 64 KiB would be 196 MiB
    assert len(result.text) < 200_000
    assert "local_domains = " not in result.text.replace("# local_domains", "")
