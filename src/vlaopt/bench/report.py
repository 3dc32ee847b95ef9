"""Benchmark output: a terminal table, markdown, JSON (every table column is a JSON field)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from vlaopt.utils.io import atomic_write_text

# (column title, JSON path in a row, format)
COLUMNS: list[tuple[str, tuple[str, ...], str]] = [
    ("recipe", ("recipe",), "{}"),
    ("vision ms", ("ms", "vision"), "{:.2f}"),
    ("proj ms", ("ms", "projector"), "{:.2f}"),
    ("lm ms", ("ms", "lm"), "{:.2f}"),
    ("prune ms", ("ms", "lm.prune"), "{:.2f}"),
    ("head ms", ("ms", "head"), "{:.2f}"),
    ("prefix ms", ("ms", "prefix"), "{:.2f}"),  # expert heads: VLM prefix, reasoning decode, flow steps
    ("reasoning ms", ("ms", "reasoning"), "{:.2f}"),
    ("flow ms", ("ms", "flow"), "{:.2f}"),
    ("trajectory ms", ("ms", "trajectory"), "{:.2f}"),
    ("total ms", ("ms", "total"), "{:.2f}"),
    ("speedup", ("speedup_total",), "{:.2f}x"),
    ("lm speedup", ("speedup_lm",), "{:.2f}x"),
    ("lm GFLOPs", ("gflops", "lm"), "{:.3f}"),
    ("lm FLOPs ratio", ("lm_flops_ratio",), "{:.3f}"),
    ("lm % of peak", ("achieved_fraction", "lm"), "{:.1%}"),
    ("prefix GFLOPs", ("gflops", "prefix"), "{:.3f}"),
    ("flow GFLOPs", ("gflops", "flow"), "{:.3f}"),
    ("prefix % of peak", ("achieved_fraction", "prefix"), "{:.1%}"),
    ("tokens in", ("visual_tokens_in",), "{}"),
    ("tokens out", ("visual_tokens_out",), "{:.1f}"),
    ("params M", ("params_m",), "{:.3f}"),
    ("err vs base", ("action_err_vs_baseline",), "{:.4f}"),
    ("err vs demo", ("action_err_vs_demo",), "{:.4f}"),
    ("success", ("success", "overall"), "{:.1%}"),
    ("success 95% CI", ("success", "ci95"), "{0[0]:.0%}-{0[1]:.0%}"),
]


# The terminal table keeps to what fits a normal terminal; markdown and JSON carry everything.
TERMINAL = ("recipe", "total ms", "speedup", "lm ms", "prefix ms", "flow ms", "lm speedup", "lm FLOPs ratio",
            "tokens out", "err vs base", "err vs demo", "success", "success 95% CI")


def cell(row: dict[str, Any], path: tuple[str, ...], fmt: str) -> str:
    value: Any = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return "-" if value is None else fmt.format(value)


def _columns(result: dict[str, Any], only: tuple[str, ...] | None = None) -> list[tuple[str, tuple[str, ...], str]]:
    """Columns (all, or those named in `only`) that have a value in at least one row."""
    return [c for c in COLUMNS if (only is None or c[0] in only)
            and any(cell(r, c[1], c[2]) != "-" for r in result["rows"])]


def _title(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    return (f"vla-opt bench {result['date']} on {m['device']} ({m['processor']}, {m['threads']} threads, "
            f"matmul {m['matmul_gflops']:.0f} GFLOP/s), batch {s['batch']}, median of {s['repeats']} interleaved rounds")


def to_table(result: dict[str, Any]) -> Table:
    cols = _columns(result, TERMINAL)
    table = Table(title=_title(result))
    for title, _, _ in cols:
        table.add_column(title, justify="left" if title == "recipe" else "right")
    for row in result["rows"]:
        table.add_row(*(cell(row, path, fmt) for _, path, fmt in cols))
    return table


def to_markdown(result: dict[str, Any]) -> str:
    cols = _columns(result)
    lines = [f"_{_title(result)}_", "", "| " + " | ".join(c[0] for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r, p, f) for _, p, f in cols) + " |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], json_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write JSON, markdown and plots; returns the paths written."""
    from vlaopt.bench.plots import plot_pareto, plot_stages

    out_dir = Path(out_dir)
    written = [atomic_write_text(json_path, json.dumps(result, indent=2)),
               atomic_write_text(out_dir / "bench.md", to_markdown(result))]
    written.append(plot_pareto(result, out_dir / "pareto.png"))
    written.append(plot_stages(result, out_dir / "stages.png"))
    return written
