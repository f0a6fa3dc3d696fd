"""PNG plots of a `make bench` run: msgs/s and p95 against concurrency per ingress,
and a message's cost (RSS growth, time) against its size and part count."""

from __future__ import annotations

from pathlib import Path

from sections import Cell, Table

FLOOR_MIB = 4 / 1024  # one page: a growth of 0 is drawn here on the log axis


def _mib(kib: int) -> float:
    return max(kib / 1024, FLOOR_MIB)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    return plt


def concurrency(results: dict[str, Table | str], path: Path) -> Path | None:
    tables = {k: v for k, v in results.items() if not isinstance(v, str)}
    if not tables:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(tables), figsize=(5 * len(tables), 7), squeeze=False)
    for col, (ingress, table) in enumerate(tables.items()):
        rate_ax, p95_ax = axes[0][col], axes[1][col]
        for row, cells in table.items():
            points = sorted((c, cell) for c, cell in cells.items() if isinstance(cell, Cell))
            if not points:
                continue
            cs = [c for c, _ in points]
            rates = [cell.rate for _, cell in points]
            low = [cell.rate - min(cell.rates) for _, cell in points]
            high = [max(cell.rates) - cell.rate for _, cell in points]
            rate_ax.errorbar(cs, rates, yerr=[low, high], marker="o", capsize=3, label=row)
            if points[0][1].p95 is not None:
                p95_ax.plot(cs, [cell.p95 for _, cell in points], marker="o", label=row)
        rate_ax.set(title=f"{ingress}: msgs/s", xlabel="concurrency", yscale="log")
        p95_ax.set(title=f"{ingress}: p95 ms", xlabel="concurrency")
        if not p95_ax.has_data():  # through Postfix only the whole run is timed
            p95_ax.text(0.5, 0.5, "no per-message latency\n(timed end to end)",
                        ha="center", va="center", transform=p95_ax.transAxes)
        for ax in (rate_ax, p95_ax):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def ladder(steps: list, path: Path) -> Path | None:
    if not steps:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for shape in ("attachment", "short lines"):
        pts = [s for s in steps if s.shape == shape]
        sizes = [s.size / 1e6 for s in pts]
        axes[0].plot(sizes, [_mib(s.growth_kib) for s in pts], marker="o", label=shape)
        axes[1].plot(sizes, [s.ms for s in pts], marker="o", label=shape)
    if steps:
        biggest = max(s.size for s in steps) / 1e6
        axes[0].plot([0.01, biggest], [0.02 / 1.048576, 2 * biggest / 1.048576], "k--",
                     label="2 × size")
    parts = [s for s in steps if s.shape.endswith(" parts")]
    counts = [int(s.shape.split()[0]) for s in parts]
    axes[2].plot(counts, [s.ms for s in parts], marker="o", label="ms")
    axes[2].plot(counts, [_mib(s.growth_kib) for s in parts], marker="s", label="RSS MiB")
    axes[0].set(title="worker peak-RSS growth", xlabel="message MB", ylabel="MiB")
    axes[1].set(title="time per message", xlabel="message MB", ylabel="ms")
    axes[2].set(title="cost per part count (1 KiB parts)", xlabel="parts")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
