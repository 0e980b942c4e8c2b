"""The demo's result files: ``results.json`` (rows, options, date, machine, wall time of each
step), ``results.md`` (the table in Markdown) and ``accuracy_vs_size.png`` (top-1 against true
model size, one labelled point per row; needs matplotlib, the ``dev`` extra).

No method of its own; the rows come from :func:`vitquant.demo.run_demo_report`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from vitquant._atomic import atomic_write
from vitquant.demo.main import DemoReport, DemoRow, table_cells

__all__ = [
    "RESULTS_FORMAT",
    "machine_info",
    "report_dict",
    "markdown_table",
    "plot_accuracy_vs_size",
    "write_report",
]

RESULTS_FORMAT = "vitquant-demo-results"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where the demo ran: OS, CPU, core count, torch version and threads, GPU if any."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_dict(report: DemoReport) -> dict[str, Any]:
    """The JSON document of a report (plain data; non-finite numbers become ``null``)."""
    ref = report.rows[0].top1 if report.rows else 0.0
    rows = []
    for i, r in enumerate(report.rows):
        d = {k: _finite(v) for k, v in dataclasses.asdict(r).items()}
        d["delta_top1"] = None if i == 0 else round(r.top1 - ref, 4)
        rows.append(d)
    return {
        "format": RESULTS_FORMAT,
        "version": 1,
        "date": report.started,
        "machine": machine_info(),
        "total_seconds": round(report.seconds, 2),
        "steps": [{"name": n, "seconds": round(s, 2)} for n, s in report.steps],
        "size_unit": "MiB (2**20 bytes), true quantized size of a packed export",
        "config": dataclasses.asdict(report.config),
        "float_recipe": report.float_recipe,
        "rows": rows,
    }


def markdown_table(rows: list[DemoRow]) -> str:
    """The results table in Markdown (same cells as :func:`vitquant.demo.format_table`)."""
    head, cells = table_cells(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in c) + " |")
    return "\n".join(lines)


def _label_offsets(xy: list[tuple[float, float]], labels: list[str]) -> list[tuple[int, int]]:
    """Label offsets (points) that keep labels of nearby points apart: a greedy pass over
    candidate positions, with boxes estimated from the text length (7-point font)."""
    candidates = [(5, 2), (5, -10), (-10, 2), (5, 10), (-10, -10), (5, -18), (5, 18)]
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for (x, y), text in zip(xy, labels):
        w, h = 4.2 * len(text), 9.0
        choice = candidates[0]
        for dx, dy in candidates:
            box = (x + dx, y + dy, x + dx + w, y + dy + h)
            if all(
                box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed
            ):
                choice = (dx, dy)
                break
        placed.append((x + choice[0], y + choice[1], x + choice[0] + w, y + choice[1] + h))
        out.append(choice)
    return out


#: colour families of the plot: (name test, legend label, colour)
_FAMILIES: list[tuple[Any, str, str]] = [
    (lambda r: r.bits == "32/32", "float32", "black"),
    (lambda r: r.name.startswith("PTQ"), "PTQ", "tab:blue"),
    (lambda r: r.name.startswith("DiffQ"), "DiffQ", "tab:green"),
    (lambda r: r.name.startswith(("export", "int8")), "export / int8", "tab:grey"),
    (lambda r: r.bits.startswith("2/"), "QAT W2A2", "tab:red"),
    (lambda r: True, "QAT W4A4", "tab:orange"),
]


def _family(row: DemoRow) -> tuple[str, str]:
    return next((label, color) for test, label, color in _FAMILIES if test(row))


def plot_accuracy_vs_size(rows: list[DemoRow], path: str | os.PathLike[str]) -> bool:
    """Draws top-1 against true size (log scale): numbered points coloured by family, with the
    key of numbers to rows beside the plot; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        return False
    pts = [r for r in rows if r.size_mb is not None and r.size_mb > 0 and math.isfinite(r.top1)]
    fig = plt.figure(figsize=(11, 5.5))
    ax = fig.add_axes((0.07, 0.1, 0.6, 0.8))
    ax.set_xscale("log")
    seen: set[str] = set()
    for r in pts:
        family, color = _family(r)
        marker = "*" if r.bits == "32/32" else "D" if r.speedup is not None else "o"
        ax.scatter(
            [r.size_mb], [r.top1], marker=marker, s=110 if marker == "*" else 36, zorder=3,
            color=color, label=None if family in seen else family,
        )  # fmt: skip
        seen.add(family)
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    if pts and pts[0].bits == "32/32":
        ax.axhline(pts[0].top1, color="grey", ls="--", lw=0.8)
    if pts:
        sizes = [float(r.size_mb) for r in pts]  # type: ignore[arg-type]
        tops = [r.top1 for r in pts]
        ax.set_xlim(min(sizes) / 1.25, max(sizes) * 1.6)
        pad = max(0.5, 0.08 * (max(tops) - min(tops)))
        ax.set_ylim(min(tops) - pad, max(tops) + pad)
        fig.canvas.draw()
        disp = ax.transData.transform(list(zip(sizes, tops)))
        scale = 72.0 / fig.dpi  # pixels -> points
        xy = [(float(a) * scale, float(b) * scale) for a, b in disp]
        order = sorted(range(len(pts)), key=lambda i: (-tops[i], sizes[i]))
        numbers = [str(i + 1) for i in range(len(pts))]
        offsets = _label_offsets([xy[i] for i in order], [numbers[i] for i in order])
        for i, off in zip(order, offsets):
            ax.annotate(
                numbers[i], (sizes[i], tops[i]), textcoords="offset points", xytext=off,
                fontsize=7, va="bottom", color=_family(pts[i])[1],
            )  # fmt: skip
        key = [f"{n:>2}  {r.name}: {r.top1:.2f} %, {r.size_mb:.3f} MiB" for n, r in
               zip(range(1, len(pts) + 1), pts)]  # fmt: skip
        fig.text(0.69, 0.9, "\n".join(key), va="top", ha="left", fontsize=7.5, family="monospace")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xlabel("true model size (MiB, log scale)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Fashion-MNIST demo: accuracy against model size")
    ax.grid(alpha=0.3, which="both")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return True


def write_report(report: DemoReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Writes ``results.json``, ``results.md`` and ``accuracy_vs_size.png`` (when matplotlib
    is installed) in ``out_dir``; returns the paths written by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = report_dict(report)
    written: dict[str, Path] = {}
    text = json.dumps(doc, indent=2, allow_nan=False, default=str) + "\n"
    atomic_write(out / "results.json", lambda f: f.write(text.encode()))
    written["json"] = out / "results.json"
    md = [
        "# vitquant demo results",
        "",
        f"Run {report.started} on {doc['machine']['cpu']} ({doc['machine']['cpu_count']} cores, "
        f"torch {doc['machine']['torch']}, {doc['machine']['torch_threads']} threads); "
        f"total {report.seconds / 60:.1f} min. Sizes in MiB (true size of a packed export).",
        "",
        markdown_table(report.rows),
        "",
        "Wall time per step: " + ", ".join(f"{n} {s:.0f} s" for n, s in report.steps) + ".",
        "",
    ]
    md_text = "\n".join(md)
    atomic_write(out / "results.md", lambda f: f.write(md_text.encode()))
    written["md"] = out / "results.md"
    if plot_accuracy_vs_size(report.rows, out / "accuracy_vs_size.png"):
        written["png"] = out / "accuracy_vs_size.png"
    return written
