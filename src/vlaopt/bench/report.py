"""Benchmark output: a terminal table, markdown, JSON (every table column is a JSON field). Failed
recipes and speedups within timing noise are explained in notes below the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from vlaopt.utils.io import atomic_write_text

# (column title, JSON path in a row, format)
COLUMNS: list[tuple[str, tuple[str, ...], str]] = [
    ("recipe", ("recipe",), "{}"),
    ("inputs ms", ("ms", "inputs"), "{:.2f}"),  # checks, tokenization, numpy -> torch: not compute
    ("vision ms", ("ms", "vision"), "{:.2f}"),
    ("proj ms", ("ms", "projector"), "{:.2f}"),
    ("lm ms", ("ms", "lm"), "{:.2f}"),
    ("prune ms", ("ms", "lm.prune"), "{:.2f}"),
    ("head ms", ("ms", "head"), "{:.2f}"),
    ("prefix ms", ("ms", "prefix"), "{:.2f}"),  # expert heads: VLM prefix, reasoning decode, flow steps
    ("reasoning ms", ("ms", "reasoning"), "{:.2f}"),
    ("reasoning tokens", ("reasoning", "tokens"), "{:.1f}"),  # mean emitted per sample, STOP included
    ("reasoning tok/s", ("reasoning", "tokens_per_s"), "{:.0f}"),
    ("tokens per pass", ("reasoning", "tokens_per_pass"), "{:.2f}"),  # emitted per LM verification pass
    ("acceptance", ("reasoning", "acceptance"), "{:.0%}"),  # accepted / drafted, speculative decoding
    ("KV KB", ("reasoning", "kv_kb"), "{:.0f}"),  # the cache the expert reads, per sample
    ("reasoning acc", ("reasoning", "accuracy"), "{:.1%}"),  # exact match with the held-out targets
    ("flow ms", ("ms", "flow"), "{:.2f}"),
    ("trajectory ms", ("ms", "trajectory"), "{:.2f}"),
    ("network ms", ("ms", "network"), "{:.2f}"),  # a compiled model: everything after inputs, one call
    ("network % of peak", ("achieved_fraction", "network"), "{:.1%}"),
    ("compiles", ("compile", "compiles"), "{}"),
    ("first call s", ("compile", "first_call_s"), "{:.1f}"),
    ("total ms", ("ms", "total"), "{:.2f}"),
    ("p25-p75 ms", ("total_spread_ms",), "{0[0]:.2f}-{0[1]:.2f}"),
    ("speedup", ("speedup_total",), "{:.2f}x"),
    ("lm speedup", ("speedup_lm",), "{:.2f}x"),
    ("lm GFLOPs", ("gflops", "lm"), "{:.3f}"),
    ("lm FLOPs ratio", ("lm_flops_ratio",), "{:.3f}"),
    ("lm % of peak", ("achieved_fraction", "lm"), "{:.1%}"),
    ("vision % of peak", ("achieved_fraction", "vision"), "{:.1%}"),
    ("head % of peak", ("achieved_fraction", "head"), "{:.1%}"),
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
    ("vs base (paired)", ("success", "paired", "diff"), "{:+.1%}"),
    ("paired 95% CI", ("success", "paired", "diff_ci95"), "{0[0]:+.1%}..{0[1]:+.1%}"),
    ("McNemar p", ("success", "paired", "p_mcnemar"), "{:.3f}"),
]


# The terminal table keeps to what fits 80 columns (`wide=True`: every column); markdown and JSON
# carry everything.
TERMINAL = ("recipe", "total ms", "p25-p75 ms", "speedup", "lm ms", "prefix ms", "err vs base", "success")
TERMINAL_REASONING = ("recipe", "total ms", "speedup", "reasoning tok/s", "acceptance", "KV KB", "reasoning acc",
                      "success")
"""A policy that reasons: its reasoning columns in place of the spread and the action error."""
NOISE = "?"  # marks a speedup whose p25-p75 spread of total time overlaps the baseline's


def cell(row: dict[str, Any], path: tuple[str, ...], fmt: str) -> str:
    value: Any = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return "-" if value is None else fmt.format(value)


def _cells(row: dict[str, Any], cols: list[tuple[str, tuple[str, ...], str]]) -> list[str]:
    """A row's cells: a failed recipe shows `failed` after its name; a speedup within noise is marked."""
    if "error" in row:
        return [row["recipe"], "failed", *("-" for _ in cols[2:])][: len(cols)]
    noisy = NOISE if row.get("spread_overlaps_baseline") else ""
    return [cell(row, path, fmt) + (noisy if title == "speedup" else "") for title, path, fmt in cols]


def _columns(result: dict[str, Any], only: tuple[str, ...] | None = None) -> list[tuple[str, tuple[str, ...], str]]:
    """Columns (all, or those named in `only`, in its order) that have a value in at least one row."""
    cols = COLUMNS if only is None else [c for title in only for c in COLUMNS if c[0] == title]
    return [c for c in cols if any(cell(r, c[1], c[2]) != "-" for r in result["rows"])]


def _title(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    threads = f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}"
    return (f"vla-opt bench {result['date']} on {m['device']} ({m['processor']}, {threads}, "
            f"matmul {m['matmul_gflops']:.0f} GFLOP/s), batch {s['batch']}, median and p25-p75 of "
            f"{s['repeats']} interleaved rounds")


def notes(result: dict[str, Any]) -> list[str]:
    """What the table alone does not say: failed recipes with their errors, speedups within timing
    noise, and that a result is partial while the bench is still running."""
    lines = [f"{r['recipe']} failed during {r['failed_during']}: {r['error']}" for r in result["rows"] if "error" in r]
    noisy = [r["recipe"] for r in result["rows"] if r.get("spread_overlaps_baseline")]
    if noisy:
        lines.append(f"speedup marked {NOISE}: its p25-p75 of total time overlaps the baseline's, so it is not "
                     f"distinguishable from timing noise ({', '.join(noisy)})")
    if not result.get("complete", True):
        n = len(result["rows"])
        lines.append(f"partial result: {n} recipe{'s' if n != 1 else ''} measured, the bench has not finished")
    return lines


class FittedTable:
    """A `rich` table whose column titles wrap only when the console is too narrow for them on one
    line; cells are never cut (rich, left alone, shortens the widest column first: the recipe names)."""

    def __init__(self, table: Table, content_widths: list[int]) -> None:
        self.table = table
        self.content_widths = content_widths

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for column in self.table.columns:
            column.width = None
        if console.measure(self.table, options=options.update_width(10_000)).maximum > options.max_width:
            for column, width in zip(self.table.columns, self.content_widths):
                column.width = width
        yield self.table


def to_table(result: dict[str, Any], wide: bool = False) -> FittedTable:
    """The terminal table (the columns that fit 80 characters, or every column with `wide`), notes below."""
    reasoning = any("reasoning" in row for row in result["rows"])
    cols = _columns(result, None if wide else TERMINAL_REASONING if reasoning else TERMINAL)
    rows = [_cells(row, cols) for row in result["rows"]]
    table = Table(title=_title(result), caption="\n".join(notes(result)) or None, caption_justify="left")
    widths = []
    for i, (title, _, _) in enumerate(cols):
        table.add_column(title, justify="left" if title == "recipe" else "right", overflow="fold")
        widths.append(max([len(word) for word in title.split()] + [len(r[i]) for r in rows]))
    for cells in rows:
        table.add_row(*cells)
    return FittedTable(table, widths)


def to_markdown(result: dict[str, Any]) -> str:
    """Every column with a value, the notes as a list below the table."""
    cols = _columns(result)
    lines = [f"_{_title(result)}_", "", "| " + " | ".join(c[0] for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cells(r, cols)) + " |" for r in result["rows"]]
    extra = notes(result)
    return "\n".join(lines + ([""] + [f"- {line}" for line in extra] if extra else [])) + "\n"


def write_results(result: dict[str, Any], json_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the JSON and markdown atomically (called as each recipe's row is added, so an interrupted
    bench keeps what it measured); returns the paths written."""
    return [atomic_write_text(json_path, json.dumps(result, indent=2)),
            atomic_write_text(Path(out_dir) / "bench.md", to_markdown(result))]


def write_outputs(result: dict[str, Any], json_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write JSON, markdown and plots; returns the paths written."""
    from vlaopt.bench.plots import plot_pareto, plot_stages

    out_dir = Path(out_dir)
    return [*write_results(result, json_path, out_dir), plot_pareto(result, out_dir / "pareto.png"),
            plot_stages(result, out_dir / "stages.png")]
