"""Fuzzing `amavisd import-config` with hostile configuration files: whatever
a site's conf.d holds, the result is TOML that amavisd's loader accepts or
one error naming file and line; never a traceback, never a hang, never a
command run."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import tomllib

from hypothesis import given
from hypothesis import strategies as st

from amavisd.config import load
from amavisd.migrate.importer import import_config
from amavisd.migrate.lexer import PerlSyntaxError, tokenize
from amavisd.migrate.perlre import RegexNotTranslated, to_python
from amavisd.migrate.values import Regex

MARKER = os.path.join(tempfile.gettempdir(), "amavisd-fuzz-perlconf-ran")

# Pieces of amavisd-new configurations, including the ones that go wrong.
WORDS = st.sampled_from([
    "$max_servers", "$final_virus_destiny", "$final_unchecked_destiny", "@av_scanners",
    "$banned_filename_re", "@local_domains_maps", "@local_domains_acl", "%local_domains",
    "$policy_bank{'X'}", "$policy_bank{'AM.PDP-SOCK'}{'k'}", "$interface_policy{'10026'}",
    "$inet_socket_port", "@mynetworks", "@bypass_virus_checks_maps", "%bypass_banned_checks",
    "$MYHOME", "$TEMPBASE", "$QUARANTINEDIR", "$virus_admin", "$X_HEADER_LINE", "$mydomain",
    "$notify_method", "$unix_socketname", "$myhostname", "$sa_tag_level_deflt", "$x", "@x",
    "%x", "$x{a}", "$x->{a}", "my $h", "=", ".=", "||=", "=>", ",", ";", "(", ")", "[", "]",
    "{", "}", "\\", "\\%x", "\\&ask_daemon", "new_RE(", "read_hash(", "push @x,", "chomp(",
    "qw(a b)", "qr'^\\.(exe-ms)$'", "qr/(a|a?)+$/i", "qr{\\x{263A}(?<n>x)}x", "D_PASS",
    "D_DISCARD", "D_REJECT", "undef", "sub { 1 }", "1..5", "300*1024", "2**", "0660", "1_000",
    "'/var/lib/amavis'", '"$MYHOME/tmp"', '"a\\@b"', "'x'", '"\\n"', '"${x}y"', "`true`",
    f"`touch {MARKER}`", f"qx(touch {MARKER})", "`head -n 1 /etc/hostname`", "if (1) {",
    "#", "\n", "=pod\n", "=cut\n", "__END__", "<<EOF", "$#x", "${", "'", '"', "@{", "%{",
    "\x00", "\u2028", "[1]", "9e999", "'nan'", "-9e999", "$x[9e999]", "$x[0]", "x 3",
    "'1' x 99999", "0" * 5000, "/ 0", "% 0", "10026 =>", "'0660'", "{'SOCK' => 'B'}", "['.example.com', '!x']", "{ originating => 1 }", "1;",
])
perlish = st.lists(WORDS, max_size=60).map(" ".join)
junk = st.text(max_size=400)


def run_import(text: str) -> None:
    """The property: TOML that loads, or a PerlSyntaxError naming file:line."""
    directory = tempfile.mkdtemp(prefix="amavisd-fuzz-")
    try:
        path = os.path.join(directory, "50-user")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(text)
        started = time.monotonic()
        try:
            result = import_config([path])
        except PerlSyntaxError as err:
            assert str(err).startswith(f"{path}:"), err
            return
        finally:
            assert time.monotonic() - started < 10, "import-config took too long"
        assert result.load_error == ""
        tomllib.loads(result.text)
        out = os.path.join(directory, "out.toml")
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(result.text)
        load(out)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert not os.path.exists(MARKER), "a command from the configuration was run"


@given(perlish)
def test_perl_like_input_gives_loadable_toml_or_an_error_with_file_and_line(text):
    run_import(text)


@given(junk)
def test_any_text_gives_loadable_toml_or_an_error_with_file_and_line(text):
    run_import(text)


@given(st.text(max_size=300))
def test_the_lexer_raises_nothing_but_its_own_error(text):
    try:
        tokens = tokenize(text, "f")
    except PerlSyntaxError as err:
        assert str(err).startswith("f:")
    else:
        assert tokens[-1].kind == "eof"


@given(st.text(alphabet=st.sampled_from(list("ab.^$\\()[]{}|?*+:<>!=#-iPpQEzZxKG0123 \n'")),
               max_size=40),
       st.sampled_from(["", "i", "x", "m", "imsx", "e"]),
       st.sampled_from(["broaden", "insensitive-ok", "given"]))
def test_a_perl_regex_is_translated_into_one_python_compiles_or_refused(pattern, flags, case):
    import re

    try:
        body = to_python(Regex(pattern, flags), case=case, blanks_escaped=case != "given")
    except RegexNotTranslated as err:
        assert str(err)
    else:
        re.compile(body)
        if case != "given":
            assert not any(c.isspace() or c in "'\"" for c in body)
