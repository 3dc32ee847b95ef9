"""Paired success statistics (eval/paired.py) and `vla-opt compare`."""

from __future__ import annotations

import json
from math import comb

import numpy as np
import pytest

from vlaopt.cli import main
from vlaopt.eval.paired import compare_episodes, mcnemar_exact, paired_bootstrap_ci


def test_mcnemar_exact_known_values_and_symmetry() -> None:
    # statsmodels.stats.contingency_tables.mcnemar([[a, b], [c, d]], exact=True).pvalue
    assert mcnemar_exact(1, 9) == pytest.approx(0.021484375)
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0
    for b in range(8):
        for c in range(8):
            assert mcnemar_exact(b, c) == mcnemar_exact(c, b)
            # the two-sided p is the probability of every split at most as likely as the one seen
            n = b + c
            seen = comb(n, b)
            assert mcnemar_exact(b, c) == pytest.approx(min(1.0, sum(comb(n, k) for k in range(n + 1)
                                                                    if comb(n, k) <= seen) / 2**n))
    with pytest.raises(ValueError, match=r"discordant counts must be >= 0, got b=-1, c=2"):
        mcnemar_exact(-1, 2)


def test_paired_bootstrap_interval() -> None:
    rng = np.random.default_rng(1)
    x = rng.random(400) < 0.8
    y = x.copy()
    assert paired_bootstrap_ci(x, y) == (0.0, 0.0)  # identical outcomes: no difference in any resample
    y[:40] = ~y[:40]  # flip 40 pairs
    lo, hi = paired_bootstrap_ci(x, y)
    assert lo <= y.mean() - x.mean() <= hi and hi - lo < 0.1
    with pytest.raises(ValueError, match=r"equal-length, non-empty 1-d outcome arrays, got \(3,\) and \(2,\)"):
        paired_bootstrap_ci(x[:3], y[:2])


def _episodes(outcomes: dict[tuple[str, int], bool], seed_offset: int = 0) -> list[dict]:
    return [{"task": t, "episode": e, "seed": 100 * e + len(t) + seed_offset, "success": s, "steps": 10}
            for (t, e), s in outcomes.items()]


def test_compare_pairs_by_task_and_episode() -> None:
    base = {("a-v3", 0): True, ("a-v3", 1): True, ("a-v3", 2): False, ("b-v3", 0): True, ("b-v3", 1): False}
    other = {("a-v3", 0): False, ("a-v3", 1): True, ("a-v3", 2): True, ("b-v3", 0): False, ("b-v3", 1): False}
    run_other = list(reversed(_episodes(other)))  # order does not matter, (task, episode) does
    run_other.append({"task": "b-v3", "episode": 2, "seed": 7, "error": "worker died"})  # never ran: not paired
    c = compare_episodes(_episodes(base), run_other)
    assert (c.episodes, c.base_successes, c.other_successes, c.only_base, c.only_other) == (5, 3, 2, 2, 1)
    assert c.p_mcnemar == 1.0 and c.diff == pytest.approx(-0.2)
    with pytest.raises(ValueError, match=r"a-v3 episode 0 started from seed 4 in the baseline and 5 in the other"):
        compare_episodes(_episodes(base), _episodes(other, seed_offset=1))
    with pytest.raises(ValueError, match="no episode \\(task, episode\\) in common"):
        compare_episodes(_episodes({("a-v3", 0): True}), _episodes({("b-v3", 0): True}))


def test_compare_command(tmp_path, capsys) -> None:
    base = {("a-v3", e): True for e in range(12)}
    other = {("a-v3", e): e >= 10 for e in range(12)}  # 10 discordant pairs, all against the other
    for name, runs in (("base", base), ("other", other)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"episodes": _episodes(runs)}))
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tmp_path / "base.json"), str(tmp_path / "other.json"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows["overall"]["only_base"] == 10 and rows["overall"]["p_mcnemar"] == pytest.approx(2 / 2**10)
    assert rows["a-v3"] == rows["overall"]
    printed = capsys.readouterr().out
    assert "p: exact McNemar" in printed and "-83.3%" in printed  # 2/12 - 12/12
    (tmp_path / "bad.json").write_text(json.dumps({"tasks": {}}))
    assert main(["compare", str(tmp_path / "base.json"), str(tmp_path / "bad.json")]) == 2
    assert "bad.json has no 'episodes' list; expected a file written by vla-opt eval --json" in capsys.readouterr().err
