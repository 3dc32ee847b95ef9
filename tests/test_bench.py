"""The benchmark harness: stages add up, FLOPs follow the analytic count, outputs are complete."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import observations

from vlaopt import VLA, VLAConfig, apply
from vlaopt.bench.flops import FlopRecorder, analytic_lm_flops
from vlaopt.bench.harness import STAGES
from vlaopt.bench.plots import pareto_front
from vlaopt.bench.report import COLUMNS, TERMINAL, cell
from vlaopt.bench.stages import time_once
from vlaopt.cli import main


@pytest.mark.parametrize("head", ["l1", "flow"])
def test_stage_times_add_up_to_the_end_to_end_time(head):
    cfg = VLAConfig.tiny(head=head, cameras=2, proprio_dim=3, image_size=64)
    model = apply(VLA(cfg).eval(), [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}}])
    images, instructions, proprio = observations(cfg, batch=2)
    for _ in range(3):
        time_once(model, images, instructions, proprio)
    runs = [time_once(model, images, instructions, proprio) for _ in range(15)]
    parts = statistics.median(sum(r[s] for s in STAGES) for r in runs)
    total = statistics.median(r["total"] for r in runs)
    assert set(STAGES) | {"lm.prune", "total"} == set(runs[0])
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
