"""Command-line scanners, the AMaViS tradition: one run over a dir of parts.

A definition (`definitions.CommandDefinition`, checked with the config)
says how to run the product (an argv template, never a shell) and how to
read it: which exit codes mean clean, infected or anything else (an error),
and a regular expression that picks the virus names, and ideally the file,
out of its output. `clamscan` is built in and tested;
`etc/scanners-examples.toml` has untested definitions of others.

Parts are written to a private 0700 dir, one file per part named by its id,
so the output maps back to the part tree. The scanner runs in its own
session and is killed with everything it forked when its timeout passes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence

from amavisd.decode.parts import Part
from amavisd.scan.base import Health, ScannerError, ScanReport
from amavisd.scan.definitions import CommandDefinition
from amavisd.verdict import Finding

OUTPUT_LIMIT = 4 * 1024 * 1024
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
       "LC_ALL": "C.UTF-8"}


class CommandScanner:
    def __init__(self, name: str, definition: CommandDefinition, tempbase: str | None = None):
        self.name = name
        self.definition = definition
        self.timeout = definition.timeout
        self.tempbase = tempbase if tempbase and os.path.isdir(tempbase) else None
        self._names = re.compile(definition.names, re.M)

    def scan(self, parts: Sequence[Part]) -> ScanReport:
        report = ScanReport(self.name)
        todo = [p for p in parts if p.size]
        if not todo:
            return report
        workdir = tempfile.mkdtemp(prefix="scan-", dir=self.tempbase)
        try:
            by_file = {}
            for part in todo:
                path = os.path.join(workdir, part.id)
                part.write_to(path)
                by_file[part.id] = part
            files = [os.path.join(workdir, pid) for pid in by_file]
            code, output = self._run(self._argv(workdir, files))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        d = self.definition
        if code in d.clean:
            return report
        if code not in d.infected:
            lines = output.strip().splitlines() or ["no output"]
            first_error = next((ln for ln in lines if "rror" in ln), lines[-1])
            raise ScannerError(f"exit status {code}: {first_error.strip()[:200]}")
        gave_up = re.compile(d.unchecked_names) if d.unchecked_names else None
        for match in self._names.finditer(output):
            part = _part_named(match.groupdict().get("path") or "", by_file)
            where = part.path if part is not None else "message"
            if gave_up is not None and gave_up.search(match["name"]):
                report.missed[where] = f"{self.name}: {match['name']}"
                continue
            report.findings.append(Finding(part=where, name=match["name"], scanner=self.name))
        if not report.findings and not report.missed:  # infected by exit status, yet no name we could read
            report.findings.append(Finding(part="message", name=f"{self.name}-unnamed",
                                           scanner=self.name))
        return report

    def health(self) -> Health:
        argv = self.definition.version_argv
        if not argv:
            found = shutil.which(self.definition.argv[0], path=ENV["PATH"])
            return Health(self.name, bool(found), found or f"{self.definition.argv[0]} not found")
        try:
            code, output = self._run(list(argv), timeout=30.0)
        except ScannerError as err:
            return Health(self.name, False, str(err))
        line = (output.strip().splitlines() or [""])[0]
        return Health(self.name, code == 0, line or f"exit status {code}")

    def _argv(self, workdir: str, files: list[str]) -> list[str]:
        argv: list[str] = []
        for arg in self.definition.argv:
            if arg == "{files}":
                argv.extend(files)
            else:
                argv.append(arg.replace("{dir}", workdir))
        return argv

    def _run(self, argv: list[str], timeout: float | None = None) -> tuple[int, str]:
        limit = timeout or self.timeout
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=ENV, close_fds=True,
                                    start_new_session=True)
        except OSError as err:
            raise ScannerError(f"cannot run {argv[0]}: {err.strerror}") from None
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ScannerError(f"no answer within {limit:g}s") from None
        return proc.returncode, out[:OUTPUT_LIMIT].decode("utf-8", "replace")


def _part_named(path: str, by_file: dict[str, Part]) -> Part | None:
    return by_file.get(os.path.basename(path.strip()))
