"""`amavisd import-config`, start to end: read, translate, render, prove it loads.

The rendered TOML is loaded by amavisd's own loader (`config.load`, as
`amavisd check-config -c` does) before it is handed out. A setting that
passes its own check but fails one across settings (a temp base that holds
the work base) is commented out with the loader's words, and the file is
loaded again, so the output always loads.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

from amavisd.config import ConfigError, load
from amavisd.migrate.evaluate import Reader
from amavisd.migrate.render import render
from amavisd.migrate.scope import Untranslated
from amavisd.migrate.sources import SourceError, default_paths
from amavisd.migrate.translate import planned_sections, run

MAX_RETRIES = 10
KEY_IN_ERROR = re.compile(r"\b([a-z]+)\.([a-z_]+)\b")


@dataclass
class Imported:
    text: str
    files: list[str]
    translated: int
    untranslated: int
    load_error: str = ""  # empty when the output loads (it always should)


def import_config(paths: list[str] | None = None,
                  defines: dict[str, str] | None = None) -> Imported:
    """Raises SourceError for a path that is not there, PerlSyntaxError for a
    file that cannot be read as Perl at all."""
    reader = Reader(defines)
    paths = paths or default_paths()
    if not paths:
        raise SourceError("no /etc/amavis/conf.d here: name the amavisd-new configuration "
                          "(directories or files)")
    for path in paths:
        reader.read_path(path)
    sections = planned_sections()
    out = run(reader, sections)
    files = reader.files + reader.skipped_files
    for skipped in reader.skipped_files:
        out.untranslated.append(Untranslated(f"{skipped}:0", "the whole file", "run-parts "
                                             "skips this name, so amavisd-new never read it"))
    refused: dict[tuple[str, str], str] = {}
    error = ""
    for _ in range(MAX_RETRIES):
        text, verdicts = render(out, sections, files, refused)
        error = _load_error(text)
        key = _culprit(error, out.settings)
        if not error or key is None or ("", key) in refused:
            break
        refused[("", key)] = error.split(": ", 1)[-1]
    active = sum(1 for k in out.settings if ("", k) not in verdicts.refused and
                 ("", k) not in verdicts.pending)
    return Imported(text, reader.files, active, len(out.untranslated) + len(verdicts.refused),
                    error)


def _load_error(text: str) -> str:
    fd, path = tempfile.mkstemp(prefix="amavisd-import-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        load(path)
    except ConfigError as err:
        return str(err).replace(path, "the translated config")
    finally:
        os.unlink(path)
    return ""


def _culprit(error: str, settings: dict[str, object]) -> str | None:
    """The translated setting a cross-setting error names, if any."""
    for _, key in KEY_IN_ERROR.findall(error):
        if key in settings:
            return key
    if "work_base" in error:  # the work base must lie outside the temp base
        return next((k for k in ("tempbase", "workdir") if k in settings), None)
    return None
