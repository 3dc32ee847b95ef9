"""The benchmark harness: stages add up, FLOPs follow the analytic count, outputs are complete."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest
import torch
from conftest import observations
from rich.console import Console

from vlaopt import VLA, VLAConfig, apply, load
from vlaopt.bench import harness
from vlaopt.bench.flops import FlopRecorder, analytic_lm_flops
from vlaopt.bench.harness import STAGES, BenchConfig, Demonstrations, random_observations, run_bench
from vlaopt.bench.heldout import HELDOUT_FILE, save_npz
from vlaopt.bench.plots import pareto_figure, pareto_front, stages_figure
from vlaopt.bench.recipes import DEFAULT_RECIPES, recipes_from_files
from vlaopt.bench.report import COLUMNS, TERMINAL, cell, to_markdown, to_table
from vlaopt.bench.stages import time_once
from vlaopt.cli import main
from vlaopt.eval.closed_loop import EvalConfig, evaluate
from vlaopt.eval.paired import compare_episodes
from vlaopt.eval.reasoning import reasoning_texts
from vlaopt.model import expert_policy
from vlaopt.optimize import load_recipe


@pytest.mark.parametrize("head", ["l1", "flow", "expert"])
def test_stage_times_add_up_to_the_end_to_end_time(head):
    cfg = VLAConfig.tiny(head=head, cameras=2, proprio_dim=3, image_size=64)
    model = apply(VLA(cfg).eval(), [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}}])
    images, instructions, proprio = observations(cfg, batch=2)
    for _ in range(3):
        time_once(model, images, instructions, proprio)
    runs = [time_once(model, images, instructions, proprio) for _ in range(15)]
    stages = ("prefix", "flow") if head == "expert" else ("lm", "head")
    assert {"inputs", "vision", "projector", *stages, "lm.prune", "total"} == set(runs[0])
    # within each call the stages nest inside the end-to-end time, and leave under 10% of it untimed
    # (a per-call ratio: a busy moment of a shared machine stretches the stages and the total alike)
    shares = [sum(r.get(s, 0.0) for s in STAGES) / r["total"] for r in runs]
    assert max(shares) <= 1.0
    assert statistics.median(shares) >= 0.90


@pytest.mark.parametrize("lm", ["llama", "qwen3"])
@pytest.mark.parametrize("step", [None, {"method": "fastv", "layer": 1, "keep": 0.25},
                                  {"method": "pooling", "keep": 0.25}])
def test_lm_flops_follow_the_analytic_count_as_tokens_are_pruned(lm, step):
    cfg = VLAConfig.tiny(lm=lm, cameras=2, proprio_dim=3)
    model = VLA(cfg).eval()
    if step:
        apply(model, [{"token_pruning": step}])
    images, instructions, proprio = observations(cfg, batch=1)
    recorder = FlopRecorder()
    model.predict_action(images, instructions, proprio, timer=recorder)
    full = len(model.lm.decoder.layers) * [1 + 32 + 1 + len(model.preprocess(images, instructions, proprio).prompt_ids[0]) + 28 + 1]
    n_visual_after = {None: 32, "fastv": 8, "pooling": 8}[step and step["method"]]
    start = step["layer"] if step and "layer" in step else 0
    seq = [n - (32 - n_visual_after) if i >= start else n for i, n in enumerate(full)]
    expected = analytic_lm_flops(model.lm.causal_lm.config, seq)
    assert recorder.flops["lm"] - recorder.flops.get("lm.prune", 0) == expected
    if step:  # fewer tokens, proportionally fewer FLOPs than the unpruned count
        assert expected < analytic_lm_flops(model.lm.causal_lm.config, full)


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.2), (1.5, 0.6), (3.0, 0.1), (3.5, 0.3)]
    assert pareto_front(points) == [0, 1, 3]


def test_bench_quick_writes_table_json_markdown_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: column titles print unwrapped
    cfg = VLAConfig.tiny(cameras=2, proprio_dim=3)
    VLA(cfg).save_pretrained(tmp_path / "m")
    demos = random_observations(cfg, 20, seed=1)
    demos.actions = torch.zeros(20, cfg.chunk, cfg.action_dim)
    save_npz(demos, tmp_path / "m" / HELDOUT_FILE)
    out = tmp_path / "out"
    torch.set_num_threads(2)
    try:
        assert main(["bench", "--model", str(tmp_path / "m"), "--quick", "--repeats", "2", "--out", str(out)]) == 0
        assert torch.get_num_threads() == 2  # the bench's thread count does not leak out of it
    finally:
        torch.set_num_threads(1)
    printed = capsys.readouterr().out
    # --out holds every file bench writes, the JSON included
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "pareto.png", "stages.png"]
    result = json.loads((out / "bench.json").read_text())
    assert result["complete"] and [r["recipe"] for r in result["rows"]] == ["baseline", "fastv-25", "pooling-25"]
    # timing runs on one thread by default on CPU, and says so
    assert result["machine"]["threads"] == 1 and "1 thread," in printed
    # --quick says what it leaves out
    assert "quick: 3 recipes, 2 rounds, 16 of 20 held-out samples" in printed
    assert result["settings"]["quick"] == "3 recipes, 2 rounds, 16 of 20 held-out samples"
    assert result["settings"]["quality_samples"] == 16
    # every column the table or markdown shows is a JSON field of every row
    markdown = (out / "bench.md").read_text()
    for title, path, fmt in COLUMNS:
        values = [cell(r, path, fmt) for r in result["rows"]]
        if any(v != "-" for v in values):
            assert f" {title} |" in markdown
            if title in TERMINAL:
                assert title in printed
        else:
            assert f" {title} |" not in markdown
    base = result["rows"][0]
    assert base["speedup_total"] == 1.0 and base["action_err_vs_baseline"] == 0.0
    assert result["rows"][1]["visual_tokens_out"] == 8 and result["rows"][1]["lm_flops_ratio"] < 1
    # a speedup whose p25-p75 overlaps the baseline's is flagged, in the JSON and below the table
    lo, hi = base["total_spread_ms"]
    assert base["spread_overlaps_baseline"] is None and lo <= base["ms"]["total"] <= hi
    for row in result["rows"][1:]:
        r_lo, r_hi = row["total_spread_ms"]
        assert row["spread_overlaps_baseline"] == (r_lo <= hi and lo <= r_hi)
    noisy = any(r["spread_overlaps_baseline"] for r in result["rows"])
    assert ("not distinguishable from timing noise" in " ".join(printed.split())) == noisy
    for name in ("pareto.png", "stages.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_bench_recipe_files_are_named_by_stem(tmp_path):
    VLA(VLAConfig.tiny()).save_pretrained(tmp_path / "m")
    (tmp_path / "half.yaml").write_text("- token_pruning: {method: random, keep: 0.5}\n")
    assert main(["bench", "--model", str(tmp_path / "m"), "--recipes", str(tmp_path / "half.yaml"), "--repeats", "1",
                 "--json", str(tmp_path / "b.json"), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["baseline", "half"]
    assert rows[1]["steps"] == [{"token_pruning": {"method": "random", "keep": 0.5}}]
    assert torch.isfinite(torch.tensor(rows[1]["ms"]["total"]))


def test_a_recipe_set_file_names_its_recipes_and_bad_entries_are_named(tmp_path):
    (tmp_path / "set.yaml").write_text("half: [{token_pruning: {method: random, keep: 0.5}}]\n"
                                       "quarter: [{token_pruning: {method: pooling, keep: 0.25}}]\n")
    recipes = recipes_from_files([str(tmp_path / "set.yaml")])
    assert list(recipes) == ["baseline", "half", "quarter"]
    assert recipes["quarter"] == [{"token_pruning": {"method": "pooling", "keep": 0.25}}]
    (tmp_path / "bad.yaml").write_text("half: {token_pruning: {method: random}}\n")
    with pytest.raises(ValueError, match=r"recipe 'half' in .*bad.yaml is \{'token_pruning'.*expected a list"):
        recipes_from_files([str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match="two recipes are named 'half'"):
        recipes_from_files([str(tmp_path / "set.yaml"), str(tmp_path / "set.yaml")])


def test_default_recipes_run_and_change_what_they_claim():
    """Every recipe of the default set applies (data-driven ones calibrate on the given inputs)."""
    cfg = VLAConfig.tiny(cameras=2, proprio_dim=3)
    model = VLA(cfg).eval()
    timing = random_observations(cfg, 16)
    result = run_bench(model, DEFAULT_RECIPES, timing, None, BenchConfig(repeats=1, warmup=0, eval_samples=16),
                       progress=False)
    rows = {r["recipe"]: r for r in result["rows"]}
    assert list(rows) == list(DEFAULT_RECIPES)
    base = rows["baseline"]
    assert rows["shortgpt-1"]["params_m"] < base["params_m"] and rows["attn-drop-1"]["params_m"] < base["params_m"]
    assert rows["int8"]["weights_mb"] < base["weights_mb"] and rows["pooling-25+int8"]["visual_tokens_out"] == 8
    assert 0 < rows["wanda-2:4"]["action_err_vs_baseline"] and result["settings"]["success"] is None
    console = Console(width=80, record=True)  # the real table of the default set fits a normal terminal
    console.print(to_table(result))
    text = console.export_text()
    assert "…" not in text and all(f"│ {name} " in text for name in DEFAULT_RECIPES)


def test_expert_stages_get_their_own_columns(tmp_path):
    model = VLA(VLAConfig.tiny(head="expert", cameras=2, proprio_dim=3)).eval()
    result = run_bench(model, {"baseline": [], "flow-2": [{"flow_steps": {"n": 2}}]},
                       random_observations(model.config, 1), None, BenchConfig(repeats=3, warmup=1, eval_samples=1),
                       progress=False)
    markdown = to_markdown(result)
    for title in ("prefix ms", "flow ms", "prefix GFLOPs", "flow GFLOPs"):
        assert f" {title} |" in markdown
    assert " lm ms |" not in markdown and " head ms |" not in markdown
    base, fewer = result["rows"]
    assert fewer["gflops"]["flow"] == pytest.approx(base["gflops"]["flow"] * 2 / model.config.head.steps)


def test_a_reasoning_policy_gets_tokens_per_second_acceptance_kv_memory_and_accuracy():
    cfg = VLAConfig.tiny(head="expert", cameras=2, proprio_dim=3)
    cfg.head = replace(cfg.head, reasoning_tokens=8)
    model = VLA(cfg).eval()
    obs = random_observations(cfg, 4)
    said = reasoning_texts(model, expert_policy.rollout(model, *obs).reasoning)
    quality = Demonstrations(obs.images, obs.instructions, obs.proprio, reasoning=[*said[:3], "something else"])
    recipes = {"baseline": [], "retrieval": [{"speculative": {"draft": "retrieval", "k": 3, "texts": {"abc": 1}}}]}
    result = run_bench(model, recipes, obs, quality, BenchConfig(batch=2, repeats=2, warmup=0, eval_samples=4),
                       progress=False)
    base, spec = result["rows"]
    for row in (base, spec):
        r = row["reasoning"]
        assert r["accuracy"] == 0.75 and r["tokens"] == 8  # greedy text of an untrained LM: no STOP in 8 tokens
        assert r["tokens_per_s"] == pytest.approx(2 * 8 / (row["ms"]["reasoning"] / 1e3))
        state = model.encode(model.preprocess(*obs))  # one batch of 4, prompts padded to the longest
        cache, _ = expert_policy.fill_prefix(model, state)
        slot = cache.nbytes() / state.hidden.numel() * state.hidden.shape[-1]  # every layer's K and V of a slot
        assert r["kv_kb"] * 1024 == pytest.approx(slot * (state.hidden.shape[1] + 8))
    assert base["reasoning"]["tokens_per_pass"] == 1.0 and base["reasoning"]["acceptance"] is None
    assert 0 < spec["reasoning"]["acceptance"] <= 1 and spec["reasoning"]["tokens_per_pass"] > 1  # fewer passes
    markdown = to_markdown(result)
    for title in ("reasoning tok/s", "tokens per pass", "acceptance", "KV KB", "reasoning acc"):
        assert f" {title} |" in markdown


def test_success_column_equals_a_closed_loop_evaluation(tmp_path, capsys):
    """`--success` runs each recipe's model from the same initial states as `vla-opt eval` would."""
    pytest.importorskip("metaworld")
    cfg = VLAConfig.tiny(cameras=2, proprio_dim=4, action_dim=4, chunk=4)
    model = VLA(cfg).eval()
    model.set_stats({"action": {"q01": [-1.0] * 4, "q99": [1.0] * 4}, "proprio": {"q01": [-0.5] * 4, "q99": [0.5] * 4}})
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "r.yaml").write_text("- token_pruning: {method: random, keep: 0.5}\n")
    assert main(["bench", "--model", str(tmp_path / "m"), "--recipes", str(tmp_path / "r.yaml"), "--repeats", "1",
                 "--success", "--tasks", "drawer-close-v3", "--episodes", "2", "--workers", "0", "--max-steps", "20",
                 "--seed", "5", "--json", str(tmp_path / "b.json"), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    pruned = apply(load(tmp_path / "m"), load_recipe(str(tmp_path / "r.yaml")))
    for row, reference in zip(rows, (load(tmp_path / "m"), pruned)):
        expected = evaluate(reference, ["drawer-close-v3"], EvalConfig(episodes=2, max_steps=20, seed=5, workers=0),
                            progress=False)
        assert row["success"]["episodes"] == 2
        assert row["success"]["successes"] == expected.overall.successes
        timed = ("stall_s", "stage_ms")  # timings differ from run to run
        assert [{k: v for k, v in e.items() if k not in timed} for e in row["success"]["episode_results"]] == \
            [{k: v for k, v in e.items() if k not in timed} for e in expected.episodes]
    assert "paired" not in rows[0]["success"]  # the pruned row is paired with the baseline's episodes
    assert rows[1]["success"]["paired"] == compare_episodes(rows[0]["success"]["episode_results"],
                                                            rows[1]["success"]["episode_results"]).to_dict()
    capsys.readouterr()
    assert main(["bench", "--model", str(tmp_path / "m"), "--success"]) == 2  # a user error: one line, status 2
    assert "vla-opt: error: --success needs --tasks (MetaWorld tasks to run) for model " in capsys.readouterr().err


def test_int8_linears_are_counted_like_the_float_ones():
    """quantized.linear_dynamic is invisible to torch's flop counter; ours counts it, so int8 keeps the FLOPs."""
    model = VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).eval()
    quantized = apply(VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).eval(), [{"quantize": {"method": "int8"}}])
    images, instructions, proprio = observations(model.config)
    counts = []
    for m in (model, quantized):
        flops = FlopRecorder()
        m.predict_action(images, instructions, proprio, timer=flops)
        counts.append(flops.flops["lm"])
    assert counts[0] == counts[1] > 0


def test_a_recipe_that_cannot_stack_on_an_optimized_model_is_reported_and_the_others_measured(tmp_path, capsys):
    """Benching a pooled model: pooling again is rejected, the row says why, fastv is still measured."""
    model = apply(VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).eval(),
                  [{"token_pruning": {"method": "pooling", "keep": 0.25}}])
    model.save_pretrained(tmp_path / "pooled")
    out = tmp_path / "out"
    assert main(["bench", "--model", str(tmp_path / "pooled"), "--quick", "--repeats", "1", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    result = json.loads((out / "bench.json").read_text())
    rows = {r["recipe"]: r for r in result["rows"]}
    assert list(rows) == ["baseline", "fastv-25", "pooling-25"] and result["complete"]
    failed = rows["pooling-25"]
    assert failed["error"].startswith("ValueError: ") and failed["failed_during"] == "apply"
    assert "ms" not in failed and rows["fastv-25"]["ms"]["total"] > 0 and "error" not in rows["fastv-25"]
    assert f"pooling-25 failed during apply: {failed['error']}" in printed
    assert "pooling-25 │ failed" in printed
    assert f"pooling-25 failed during apply: {failed['error']}" in " ".join((out / "bench.md").read_text().split())
    assert (out / "pareto.png").is_file() and (out / "stages.png").is_file()  # plots leave the failed row out


def _failing_after(monkeypatch, target: list, calls: int) -> None:
    """Make the model built from the recipe object `target` raise on its `calls`+1-th predict_action."""
    real_apply = harness.apply

    def fake_apply(model, recipe, **kwargs):
        model = real_apply(model, recipe, **kwargs)
        if recipe is target:
            real, count = model.predict_action, [0]

            def predict_action(*args, **kw):
                count[0] += 1
                if count[0] > calls:
                    raise RuntimeError("kernel  exploded\non this input")
                return real(*args, **kw)

            model.predict_action = predict_action
        return model

    monkeypatch.setattr(harness, "apply", fake_apply)


@pytest.mark.parametrize("calls, phase", [(0, "warm-up"), (2, "timing"), (3, "measurement")])
def test_a_recipe_failing_while_it_runs_is_reported_and_the_others_measured(monkeypatch, calls, phase):
    """warm-up takes 1 call, timing 2 more, then the measurement: a failure in any is one failed row."""
    model = VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).eval()
    broken = [{"token_pruning": {"method": "random", "keep": 0.5}}]
    _failing_after(monkeypatch, broken, calls)
    half = [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}}]
    recipes = {"baseline": [], "broken": broken, "half": half}
    result = run_bench(model, recipes, random_observations(model.config, 2), None,
                       BenchConfig(repeats=2, warmup=1, eval_samples=2), progress=False)
    rows = {r["recipe"]: r for r in result["rows"]}
    assert rows["broken"] == {"recipe": "broken", "steps": broken, "failed_during": phase,
                              "error": "RuntimeError: kernel exploded on this input"}
    assert rows["half"]["speedup_total"] > 0 and rows["baseline"]["speedup_total"] == 1.0


def test_the_baseline_failing_is_an_error(monkeypatch):
    model = VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).eval()
    recipes = {"baseline": [], "half": [{"token_pruning": {"method": "random", "keep": 0.5}}]}
    _failing_after(monkeypatch, recipes["baseline"], 0)
    with pytest.raises(RuntimeError, match="kernel") as caught:
        run_bench(model, recipes, random_observations(model.config, 1), None,
                  BenchConfig(repeats=1, warmup=1, eval_samples=1), progress=False)
    assert "the baseline (the model as loaded) failed during warm-up" in caught.value.__notes__[0]


class _Crash(BaseException):
    """Stands for the process dying (killed, out of memory) in the middle of a bench."""


def test_results_are_saved_as_each_recipe_is_measured(tmp_path, monkeypatch):
    """The JSON and markdown are rewritten after every row, so a crash keeps what was measured."""
    VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).save_pretrained(tmp_path / "m")
    real, calls = harness.weight_size, []

    def crash_on_the_second_recipe(model):
        calls.append(1)
        if len(calls) == 2:
            raise _Crash
        return real(model)

    monkeypatch.setattr(harness, "weight_size", crash_on_the_second_recipe)
    with pytest.raises(_Crash):
        main(["bench", "--model", str(tmp_path / "m"), "--quick", "--repeats", "1", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["complete"] is False and [r["recipe"] for r in saved["rows"]] == ["baseline"]
    assert saved["rows"][0]["ms"]["total"] > 0
    markdown = (tmp_path / "out" / "bench.md").read_text()
    assert "partial result: 1 recipe measured, the bench has not finished" in markdown
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporary files


def _result(rows: list[dict]) -> dict:
    """A bench result around `rows` (the fields the table and plots read)."""
    return {"date": "2026-12-02", "complete": True,
            "machine": {"device": "cpu", "processor": "x86_64", "threads": 1, "matmul_gflops": 191.0},
            "settings": {"batch": 1, "repeats": 15}, "rows": rows}


def _row(name: str, total: float, spread: float, err: float, success: float, overlaps: bool | None) -> dict:
    return {"recipe": name, "ms": {"total": total, "vision": 1.8, "lm": total - 3.0, "head": 0.4, "flow": 0.0},
            "total_spread_ms": [total - spread, total + 2 * spread], "speedup_total": 12.0 / total,
            "action_err_vs_baseline": err, "action_err_vs_demo": err + 0.03, "visual_tokens_out": 8.0,
            "success": {"overall": success, "ci95": [success / 2, (1 + success) / 2]},
            "spread_overlaps_baseline": overlaps}


def test_the_terminal_table_fits_80_columns_and_explains_failures_and_noise():
    names = list(DEFAULT_RECIPES)
    rows = [_row(n, 12.0 - 0.3 * i, 0.1 * (i + 1), 0.01 * i, 0.9 - 0.05 * i, None if i == 0 else i % 2 == 0)
            for i, n in enumerate(names[:-1])]
    rows.append({"recipe": names[-1], "steps": [], "error": "ValueError: pooling needs each camera's full patch grid",
                 "failed_during": "apply"})
    console = Console(width=80, record=True)
    console.print(to_table(_result(rows)))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    lines = text.splitlines()
    for name in names:
        assert any(line.startswith(f"│ {name} ") for line in lines), name
    flat = " ".join(text.split())
    # total, its p25-p75, speedup, lm ms, err vs base, success
    assert "│ fastv-50 │ 11.70 │ 11.50-12.10 │ 1.03x │ 8.70 │ 0.0100 │ 85.0% │" in flat
    assert "1.05x? │" in flat and "not distinguishable from timing noise (fastv-25, divprune-25," in flat
    assert f"{names[-1]} │ failed" in flat
    assert "failed during apply: ValueError: pooling needs each camera's" in flat
    assert "speedup" in flat and "success" in flat and "vision" not in flat and "tokens" not in flat
    wide = Console(width=250, record=True)
    wide.print(to_table(_result(rows), wide=True))
    wide_text = wide.export_text()
    assert "vision ms" in wide_text and "tokens out" in wide_text and "success 95% CI" in wide_text


def test_plots_leave_failed_recipes_out_and_labels_apart():
    """Coincident points still get labels that overlap nothing; the legend lists only stages present."""
    rows = [_row(n, 10.0, 0.2, 0.05, 0.8, None) for n in ("baseline", "same-a", "same-b")]
    rows += [_row("a-long-recipe-name+with+several+steps", 9.9, 0.2, 0.05, 0.78, True),
             _row("fast", 7.0, 0.2, 0.2, 0.3, False)]
    rows.append({"recipe": "broken", "steps": [], "error": "ValueError: no", "failed_during": "apply"})
    fig = pareto_figure(_result(rows))
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
    assert sorted(labels) == sorted(r["recipe"] for r in rows[:-1])
    boxes, inside = list(labels.values()), ax.get_window_extent(renderer)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in boxes)
    fig = stages_figure(_result(rows))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["head", "lm", "vision"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [r["recipe"] for r in rows[:-1]]
    assert ax.get_ylim()[1] > max(r["ms"]["vision"] + r["ms"]["lm"] + r["ms"]["head"] for r in rows[:-1])
