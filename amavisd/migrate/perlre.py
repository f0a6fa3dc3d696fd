"""A Perl regex (as amavisd-new's `qr'...'i` holds it) in Python's `re` syntax.

Most of what a configuration writes is the same in both (`\\.(exe|scr)$`,
classes, groups, lookaheads). What differs is rewritten (`\\z`, `\\Z`,
`\\x{263A}`, `(?<name>`, the /x flag's blanks and comments), and what
Python cannot say the same way (`\\G`, `\\K`, `(?{code})`, `\\p{...}`,
POSIX `[[:alpha:]]`, case escapes) is refused with the reason, so the rule is
reported as not translated rather than translated into something else. The
result is compiled once here; a pattern Python rejects or warns about is
refused too.
"""

from __future__ import annotations

import re
import warnings

from amavisd.migrate.values import Regex

MAX_PATTERN = 4096
REFUSED = {"G": "\\G", "K": "\\K", "p": "\\p{...}", "P": "\\P{...}", "X": "\\X", "R": "\\R",
           "Q": "\\Q...\\E", "E": "\\E", "l": "\\l", "u": "\\u", "L": "\\L", "U": "\\U",
           "c": "\\c (control)", "o": "\\o{...}", "g": "\\g (backreference)", "k": "\\k<name>",
           "N": "\\N", "C": "\\C", "H": "\\H", "V": "\\V", "v": "\\v"}
REPLACED = {"z": "\\Z", "Z": "(?=\\n?\\Z)", "h": "[ \\t]", "e": "\\x1b"}
LEADING_FLAGS = re.compile(r"\(\?([imsx]+)\)")
HEX_BRACED = re.compile(r"\{([0-9a-fA-F]{1,6})\}")


class RegexNotTranslated(ValueError):
    """The pattern cannot be said in Python's syntax with the same meaning."""


def to_python(regex: Regex, *, case: str, blanks_escaped: bool = False,
              name_group: bool = False) -> str:
    """The pattern for Python.

    case: "given" keeps the regex's own /i (inline), "insensitive-ok" leaves
    case to the caller, who matches ignoring case, but keeps a case-sensitive
    regex case-sensitive with (?-i:...), "broaden" drops case sensitivity
    (a deny rule: matching more is the safe side). blanks_escaped writes
    blanks and quotes as \\xNN (a banned rule's value is one word);
    name_group turns the first capturing group into (?P<name>...).
    """
    if len(regex.pattern) > MAX_PATTERN:
        raise RegexNotTranslated(f"a pattern longer than {MAX_PATTERN} characters")
    pattern, flags = regex.pattern, regex.flags
    leading = LEADING_FLAGS.match(pattern)  # qr/(?i)\.exe$/ is qr/\.exe$/i
    if leading:
        pattern, flags = pattern[leading.end():], flags + leading.group(1)
    unknown = set(flags) - set("imsxpoadlun")  # p o a d l u n change nothing here
    if unknown:
        raise RegexNotTranslated(f"the /{''.join(sorted(unknown))} flag")
    body = _convert(pattern, "x" in flags, blanks_escaped, name_group)
    on = "".join(f for f in "ms" if f in flags)
    off = ""
    if case == "given" and "i" in flags:
        on += "i"
    elif case == "insensitive-ok" and "i" not in flags:
        off = "i"
    if on or off:
        body = f"(?{on}{'-' + off if off else ''}:{body})"
    _check(body, ignore_case=case != "given")
    return body


def _check(pattern: str, ignore_case: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            re.compile(pattern, (re.IGNORECASE if ignore_case else 0) | re.M)
        except (re.error, Warning, RecursionError, OverflowError, ValueError) as err:
            raise RegexNotTranslated(f"Python's re does not read it: {err}") from None


def _convert(pattern: str, extended: bool, blanks_escaped: bool, name_group: bool) -> str:
    out: list[str] = []
    i, in_class, named = 0, False, False
    class_start = -1
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1:i + 2]
            if not nxt:
                raise RegexNotTranslated("a pattern ending in a backslash")
            i += 2
            if nxt in REFUSED:
                raise RegexNotTranslated(f"{REFUSED[nxt]}, which Python's re has not")
            if nxt in REPLACED and not (in_class and nxt in "zZ"):
                out.append(REPLACED[nxt])
            elif nxt == "x" and pattern.startswith("{", i):
                match = HEX_BRACED.match(pattern, i)
                if not match:
                    raise RegexNotTranslated("a bad \\x{...} escape")
                code = int(match.group(1), 16)
                if code >= 0x110000:
                    raise RegexNotTranslated("a \\x{...} escape out of range")
                out.append(f"\\U{code:08x}")
                i = match.end()
            elif blanks_escaped and (nxt.isspace() or nxt in "'\""):
                out.append(f"\\x{ord(nxt):02x}" if ord(nxt) < 256 else f"\\u{ord(nxt):04x}")
            else:
                out.append("\\" + nxt)
            continue
        if in_class:
            if ch == "[" and pattern.startswith((":", "=", "."), i + 1):
                raise RegexNotTranslated("a POSIX class [[:...:]]")
            if ch == "]" and i > class_start:
                in_class = False
            elif ch == "[":
                out.append("\\[")  # Python warns about a nested-set-looking '['
                i += 1
                continue
        elif ch == "[":
            in_class = True
            class_start = i + 1
            if pattern.startswith("^", class_start):
                out.append("[^")
                i += 2
                class_start = i
                continue
        elif extended and ch.isspace():
            i += 1
            continue
        elif extended and ch == "#":
            end = pattern.find("\n", i)
            i = len(pattern) if end < 0 else end + 1
            continue
        elif ch == "(":
            rest = pattern[i + 1:i + 4]
            if rest.startswith(("?{", "??", "?|", "?^", "?&", "?R", "?P>", "*")) or \
                    re.match(r"\?[+-]?\d", rest):
                raise RegexNotTranslated(f"the ({rest[:2]}...) construct")
            if re.match(r"\?<[A-Za-z_]", rest):
                out.append("(?P<")
                i += 3
                continue
            if name_group and not named and not rest.startswith("?"):
                out.append("(?P<name>")
                named = True
                i += 1
                continue
        if blanks_escaped and (ch.isspace() or ch in "'\""):
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
        i += 1
    if name_group and not named:
        raise RegexNotTranslated("no capturing group for the virus name")
    return "".join(out)
