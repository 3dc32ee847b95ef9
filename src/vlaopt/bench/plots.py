"""Plots of a benchmark result: quality vs latency with its Pareto front, and per-stage latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlaopt.bench.harness import STAGES  # noqa: E402
from vlaopt.utils.io import atomic_write  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (lower x, lower y), ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(result: dict[str, Any], path: str | Path) -> Path:
    """Success (if measured) or action error vs total latency per recipe, Pareto front joined."""
    rows = result["rows"]
    use_success = all(r.get("success") for r in rows)
    use_demo = all(r.get("action_err_vs_demo") is not None for r in rows)
    if use_success:
        ylabel, ys = "closed-loop success (higher is better)", [r["success"]["overall"] for r in rows]
        front_y = [-y for y in ys]
    else:
        key = "action_err_vs_demo" if use_demo else "action_err_vs_baseline"
        ylabel, ys = f"{key.replace('_', ' ')} (lower is better)", [r[key] for r in rows]
        front_y = ys
    xs = [r["ms"]["total"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(xs, ys, color="tab:blue")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["recipe"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front(list(zip(xs, front_y)))
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:red", linestyle="--", label="Pareto front")
    ax.set_xlabel("predict_action latency, median ms")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_stages(result: dict[str, Any], path: str | Path) -> Path:
    """Stacked per-stage latency bars, one bar per recipe."""
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.5))
    bottom = [0.0] * len(rows)
    names = [r["recipe"] for r in rows]
    for stage in STAGES:
        vals = [r["ms"].get(stage, 0.0) for r in rows]
        ax.bar(names, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("median ms")
    ax.set_title("predict_action latency by stage")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return _save(fig, Path(path))
