"""Plots of a benchmark result: quality vs latency with its Pareto front, and per-stage latency.
Failed recipes (rows with an `error`) are left out; labels are placed where they overlap nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from vlaopt.bench.harness import NETWORK, STAGES  # noqa: E402
from vlaopt.utils.io import atomic_write  # noqa: E402

# Label offsets (points) tried in order around each point: nearest ring first, eight directions each.
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
_OFFSETS = [(r * dx, r * dy) for r in (5, 12, 22, 34, 48) for dx, dy in _DIRECTIONS]


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def measured(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of recipes that were measured (not failed)."""
    return [r for r in result["rows"] if "error" not in r]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (lower x, lower y), ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def place_labels(ax: Any, points: list[tuple[float, float]], names: list[str]) -> list[Any]:
    """Annotate each point with its name at the nearest offset where the label overlaps no point and
    no label placed before it and stays inside the axes (a thin line joins a label placed further
    out); call once the axis limits are final. Returns the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    pixels = [ax.transData.transform(p) for p in points]
    taken = [Bbox.from_bounds(px - 4, py - 4, 8, 8) for px, py in pixels]
    labels = []
    for point, name in zip(points, names):
        for i, offset in enumerate([*_OFFSETS, _OFFSETS[0]]):
            label = _label(ax, point, name, offset)
            box = label.get_window_extent(renderer).padded(2)  # a little air between neighbours
            fits = (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
                    and not any(box.overlaps(t) for t in taken))
            if fits or i == len(_OFFSETS):
                break
            label.remove()
        taken.append(box)
        labels.append(label)
    return labels


def _label(ax: Any, point: tuple[float, float], name: str, offset: tuple[float, float]) -> Any:
    dx, dy = offset
    far = abs(dx) > 6 or abs(dy) > 6
    return ax.annotate(name, point, xytext=offset, textcoords="offset points", fontsize=8,
                       ha="left" if dx > 0 else "right" if dx < 0 else "center",
                       va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                       arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": 3}
                       if far else None)


def plot_pareto(result: dict[str, Any], path: str | Path) -> Path:
    """Write `pareto_figure` as a PNG."""
    return _save(pareto_figure(result), Path(path))


def pareto_figure(result: dict[str, Any]) -> Any:
    """Success (if measured) or action error vs total latency (median, p25-p75 bars) per measured
    recipe, Pareto front joined."""
    rows = measured(result)
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
    spread = [r.get("total_spread_ms") or [x, x] for r, x in zip(rows, xs)]
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    ax.errorbar(xs, ys, xerr=[[x - lo for x, (lo, _) in zip(xs, spread)], [hi - x for x, (_, hi) in zip(xs, spread)]],
                fmt="o", color="tab:blue", ecolor="tab:blue", elinewidth=0.8, capsize=2, label="median, p25-p75")
    front = pareto_front(list(zip(xs, front_y)))
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:red", linestyle="--", label="Pareto front")
    ax.set_xlabel("predict_action latency, ms")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.2)  # room for labels inside the axes
    ax.autoscale_view()
    place_labels(ax, list(zip(xs, ys)), [r["recipe"] for r in rows])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False, fontsize=8)
    return fig


def plot_stages(result: dict[str, Any], path: str | Path) -> Path:
    """Write `stages_figure` as a PNG."""
    return _save(stages_figure(result), Path(path))


def stages_figure(result: dict[str, Any]) -> Any:
    """Stacked per-stage latency bars, one bar per measured recipe; the legend lists only the stages
    present, top of the stack first."""
    rows = measured(result)
    names = [r["recipe"] for r in rows]
    order = (*STAGES, NETWORK)
    stages = [s for s in order if any(r["ms"].get(s, 0.0) > 0 for r in rows)]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(rows) + 3), 4.5))
    bottom = [0.0] * len(rows)
    for stage in stages:
        vals = [r["ms"].get(stage, 0.0) for r in rows]
        ax.bar(names, vals, bottom=bottom, label=stage, color=f"C{order.index(stage)}")  # a stage keeps its color
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylim(0, 1.1 * max(bottom, default=1.0))
    ax.set_ylabel("median ms")
    ax.set_title("predict_action latency by stage")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    return fig
