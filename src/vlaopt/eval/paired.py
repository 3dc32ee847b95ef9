"""Paired comparison of two closed-loop evaluations run from the same initial states.

Two recipes evaluated with the same base seed meet the same initial state in each (task, episode), so
their success difference is judged episode by episode: the exact McNemar test on the discordant pairs
(b: only the baseline succeeded, c: only the other did) and a paired bootstrap interval of the difference
in success rate. Overlapping per-recipe intervals would throw that pairing away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from math import comb
from typing import Any

import numpy as np


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for `b` and `c` discordant pairs: the binomial(b + c, 1/2)
    probability of a split at least as uneven as the one seen (1.0 when there is no discordant pair)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap_ci(base: np.ndarray, other: np.ndarray, resamples: int = 10_000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(other - base) over episodes resampled in pairs with replacement."""
    base, other = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    if base.shape != other.shape or base.ndim != 1 or len(base) == 0:
        raise ValueError(f"need two equal-length, non-empty 1-d outcome arrays, got {base.shape} and {other.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(resamples, len(base)))
    diffs = (other[idx] - base[idx]).mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha))


@dataclass(frozen=True)
class PairedComparison:
    """Success of a baseline and another evaluation over the episodes both ran, paired by initial state."""

    episodes: int
    base_successes: int
    other_successes: int
    only_base: int  # b: the baseline succeeded, the other failed
    only_other: int  # c: the other succeeded, the baseline failed
    p_mcnemar: float
    diff: float  # other's success rate minus the baseline's
    diff_ci95: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """The comparison as JSON values (the interval as a list, as it reads back from JSON)."""
        return {**asdict(self), "diff_ci95": list(self.diff_ci95)}


def _outcomes(episodes: Sequence[dict[str, Any]], label: str) -> dict[tuple[str, int], tuple[int, bool]]:
    out: dict[tuple[str, int], tuple[int, bool]] = {}
    for e in episodes:
        if "success" not in e:  # an episode that failed to run has no outcome to pair
            continue
        key = (e["task"], int(e["episode"]))
        if key in out:
            raise ValueError(f"{label} lists {e['task']} episode {e['episode']} twice")
        out[key] = (int(e["seed"]), bool(e["success"]))
    return out


def compare_episodes(base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]],
                     resamples: int = 10_000) -> PairedComparison:
    """Pair two evaluations' episode records ({task, episode, seed, success}, as `vla-opt eval --json`
    writes them) by (task, episode) and compare them; raises if a shared episode started from different
    seeds (not the same initial states) or if no episode ran in both."""
    a, b = _outcomes(base, "the baseline"), _outcomes(other, "the other evaluation")
    shared = sorted(a.keys() & b.keys())
    if not shared:
        raise ValueError("the two evaluations have no episode (task, episode) in common")
    for key in shared:
        if a[key][0] != b[key][0]:
            raise ValueError(f"{key[0]} episode {key[1]} started from seed {a[key][0]} in the baseline and "
                             f"{b[key][0]} in the other: not the same initial states (evaluate both with one --seed)")
    x = np.array([a[k][1] for k in shared], dtype=float)
    y = np.array([b[k][1] for k in shared], dtype=float)
    only_base, only_other = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    return PairedComparison(
        episodes=len(shared), base_successes=int(x.sum()), other_successes=int(y.sum()),
        only_base=only_base, only_other=only_other, p_mcnemar=mcnemar_exact(only_base, only_other),
        diff=float(y.mean() - x.mean()), diff_ci95=paired_bootstrap_ci(x, y, resamples),
    )
