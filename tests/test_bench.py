"""The benchmark harness: stages add up, FLOPs follow the analytic count, outputs are complete."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import observations

from vlaopt import VLA, VLAConfig, apply
from vlaopt.bench.flops import FlopRecorder, analytic_lm_flops
from vlaopt.bench.harness import STAGES, BenchConfig, random_observations, run_bench
from vlaopt.bench.plots import pareto_front
from vlaopt.bench.recipes import DEFAULT_RECIPES, recipes_from_files
from vlaopt.bench.report import COLUMNS, TERMINAL, cell, to_markdown
from vlaopt.bench.stages import time_once
from vlaopt.cli import main
from vlaopt.eval.closed_loop import EvalConfig, evaluate
from vlaopt.optimize import load_recipe


@pytest.mark.parametrize("head", ["l1", "flow", "expert"])
def test_stage_times_add_up_to_the_end_to_end_time(head):
    cfg = VLAConfig.tiny(head=head, cameras=2, proprio_dim=3, image_size=64)
    model = apply(VLA(cfg).eval(), [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}}])
    images, instructions, proprio = observations(cfg, batch=2)
    for _ in range(3):
        time_once(model, images, instructions, proprio)
    runs = [time_once(model, images, instructions, proprio) for _ in range(15)]
    parts = statistics.median(sum(r.get(s, 0.0) for s in STAGES) for r in runs)
    total = statistics.median(r["total"] for r in runs)
    stages = ("prefix", "flow") if head == "expert" else ("lm", "head")
    assert {"inputs", "vision", "projector", *stages, "lm.prune", "total"} == set(runs[0])
    assert abs(parts - total) <= 0.10 * total


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
    full = len(model.lm.decoder.layers) * [1 + 32 + 1 + len(model._prompt_ids(instructions)[0][0]) + 28 + 1]
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
    VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    assert main(["bench", "--model", str(tmp_path / "m"), "--quick", "--repeats", "2",
                 "--json", str(out / "b.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "b.json").read_text())
    assert [r["recipe"] for r in result["rows"]] == ["baseline", "fastv-25", "pooling-25"]
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


def test_success_column_equals_a_closed_loop_evaluation(tmp_path):
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
    pruned = apply(VLA.from_pretrained(tmp_path / "m"), load_recipe(str(tmp_path / "r.yaml")))
    for row, reference in zip(rows, (VLA.from_pretrained(tmp_path / "m"), pruned)):
        expected = evaluate(reference, ["drawer-close-v3"], EvalConfig(episodes=2, max_steps=20, seed=5, workers=0),
                            progress=False)
        assert row["success"]["episodes"] == 2
        assert row["success"]["successes"] == expected.overall.successes
        assert row["success"]["episode_results"] == expected.episodes
    with pytest.raises(SystemExit, match=r"--success needs --tasks .* for model "):
        main(["bench", "--model", str(tmp_path / "m"), "--success"])


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
