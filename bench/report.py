"""Markdown for `make bench`: the tables, the ratios against the targets of issue 16,
and the README's Performance section (between two markers, nothing else touched)."""

from __future__ import annotations

import re
from pathlib import Path

from sections import Cell, Table

INGRESS_TITLES = {"ampdp": "AM.PDP", "smtp": "SMTP content filter", "milter": "milter"}
TARGET_NEW, TARGET_WHOLE = 6.0, 1.0  # ours / amavisd-new; ours / clamd decomposing
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def ingress_table(name: str, table: Table | str) -> list[str]:
    lines = [f"### {INGRESS_TITLES[name]}", ""]
    if isinstance(table, str):
        return lines + [table, ""]
    lines += ["| row | c | msgs/s (median) | min–max | p50 ms | p95 ms | p99 ms | CPU ms/msg "
              "| clamd CPU ms/msg |", "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, cells in table.items():
        for c, cell in sorted(cells.items()):
            if isinstance(cell, str):
                lines.append(f"| {row} | {c} | {cell} | | | | | | |")
                continue
            cpu = "" if row.startswith("clamd") else _ms(cell.cpu_ms)
            lines.append(f"| {row} | {c} | {cell.rate:.1f} | {min(cell.rates):.1f}–"
                         f"{max(cell.rates):.1f} | {_ms(cell.p50)} | {_ms(cell.p95)} | "
                         f"{_ms(cell.p99)} | {cpu} | {_ms(cell.clamd_ms)} |")
    return lines + [""]


def _ratio(a: Cell | str | None, b: Cell | str | None, target: float) -> str:
    """`_plain`, marked against the target."""
    plain = _plain(a, b)
    if plain == "n/a":
        return plain
    return f"{plain} {'ok' if a.rate / b.rate >= target else '**below**'}"


def ratios(results: dict[str, Table | str]) -> list[str]:
    lines = ["### Ratios: ours' msgs/s over the yardstick's (targets: ≥ 6 × amavisd-new, "
             "≥ 1 × clamd decomposing)", "",
             "| ingress | c | ours / amavisd-new | ours / clamd-whole | ours / postfix-only "
             "| postfix-only / amavisd-new |", "|:---|---:|---:|---:|---:|---:|"]
    yardstick = {"ampdp": "amavisd-new", "smtp": "amavisd-new", "milter": "c-milter+amavisd-new"}
    for name, table in results.items():
        if isinstance(table, str):
            continue
        ours = table.get("ours", {})
        for c in sorted(ours):
            new = table.get(yardstick[name], {}).get(c)
            whole = table.get("clamd-whole", {}).get(c)
            alone = table.get("postfix-only", {}).get(c)
            lines.append(f"| {INGRESS_TITLES[name]} | {c} | {_ratio(ours[c], new, TARGET_NEW)} "
                         f"| {_ratio(ours[c], whole, TARGET_WHOLE)} | {_plain(ours[c], alone)} "
                         f"| {_plain(alone, new)} |")
    return lines + ["", "The SMTP and milter rows carry smtp-source's 4 KiB messages, not the "
                    "mix, so clamd-whole (measured on the mix) is compared on AM.PDP only. "
                    "postfix-only is the same Postfix chain with no filter at all (the "
                    "content_filter pointed straight at the re-injection port; no milter): "
                    "the ceiling any filter reaches on this machine, so postfix-only / "
                    "amavisd-new is the largest ratio that ingress can show here.", ""]


def _plain(a: Cell | str | None, b: Cell | str | None) -> str:
    if not isinstance(a, Cell) or not isinstance(b, Cell) or not b.rate:
        return "n/a"
    return f"{a.rate / b.rate:.2f}"


def single(out: dict | str) -> list[str]:
    lines = ["### Latency at c=1 (real-mail corpus), the client, one message's memory", ""]
    if isinstance(out, str):
        return lines + [out, ""]
    lat = out["latency"]
    if isinstance(lat, str):
        lines.append(f"Latency: {lat}")
    else:
        verdict = "ok" if lat["p50"] < 3.0 else "**above 3 ms**"
        lines.append(f"Latency, ours over AM.PDP at c=1, {lat['messages']} real messages: "
                     f"p50 {lat['p50']:.2f} ms ({verdict}), p95 {lat['p95']:.2f} ms, "
                     f"p99 {lat['p99']:.2f} ms ({lat['rate']:.0f} msgs/s).")
    cl = out["client"]
    verdict = "ok" if cl["round_trip"] <= cl["bound"] else "**above**"
    lines += ["", f"`amavisd-client FILE` (2 KB clean): {cl['round_trip']:.1f} ms median; "
              f"`python3 -I -S -c pass` {cl['interpreter']:.1f} ms, the daemon's scan "
              f"p50 {cl['scan_p50']:.1f} ms; bound 2 × ({cl['interpreter']:.1f} + "
              f"{cl['scan_p50']:.1f}) = {cl['bound']:.1f} ms: {verdict}.", "",
              "Worker peak-RSS growth per message (one worker; target ≤ 2 × the message):", "",
              "| shape | message | growth | growth / size | ms | verdict |",
              "|:---|---:|---:|---:|---:|:---|"]
    for st in out["ladder"]:
        flag = "" if st.ratio <= 2.0 else " **over 2×**"
        lines.append(f"| {st.shape} | {st.size / 1e6:.3f} MB | {st.growth_kib / 1024:.1f} MiB "
                     f"| {st.ratio:.2f}{flag} | {st.ms:.1f} | {st.verdict} |")
    return lines + [""]


def footprint(rows: list[dict] | str) -> list[str]:
    lines = ["### Memory at 4 workers (after 200 messages; target: worker PSS < 30 MiB)", ""]
    if isinstance(rows, str):
        return lines + [rows, ""]
    lines += ["| process | RSS MiB | PSS MiB |", "|:---|---:|---:|"]
    for r in rows:
        flag = " **over**" if r["process"] != "master" and r["Pss"] / 1024 >= 30 else ""
        lines.append(f"| {r['process']} | {r['Rss'] / 1024:.1f} | {r['Pss'] / 1024:.1f}{flag} |")
    return lines + [""]


def write_readme(readme: Path, body: str) -> None:
    """Replace what lies between the markers of the Performance section."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers to fill")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{body.strip()}\n{END}", text, count=1))
