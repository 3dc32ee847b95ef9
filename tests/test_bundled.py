"""The bundled policies: what `--model medium` promises about its shape, and the package's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlaopt import VLA, VLAConfig
from vlaopt.bench.flops import FlopRecorder
from vlaopt.cli import BUNDLED_TASKS
from vlaopt.model.vla import ASSETS_DIR, BUNDLED_MODELS, resolve_model_dir
from vlaopt.sim.tasks import INSTRUCTIONS, TASK_SETS

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_names_resolve_and_local_folders_win_with_a_path() -> None:
    assert resolve_model_dir("medium") == ASSETS_DIR / "medium" and resolve_model_dir("default") == ASSETS_DIR / "default"
    assert resolve_model_dir("./medium") == Path("./medium")
    assert set(BUNDLED_TASKS) == set(BUNDLED_MODELS)  # bench --success knows each bundled policy's tasks
    for name, directory in BUNDLED_MODELS.items():
        assert (directory / "model.safetensors").is_file() and (directory / "heldout.npz").is_file(), name


def test_medium_is_shaped_like_a_deployed_vla() -> None:
    """configs/medium.yaml is what ships; visual tokens are >= 60% of every MT10 sequence, the LM holds
    >= 60% of predict_action's FLOPs and is >= 6 layers deep (the shape the MT10 issue asks for)."""
    model = VLA.from_pretrained("medium")
    shipped, config = model.config.to_dict(), VLAConfig.load(ROOT / "configs" / "medium.yaml").to_dict()
    assert {k: shipped[k] for k in config if k != "lm"} == {k: config[k] for k in config if k != "lm"}
    assert shipped["lm"]["hf_config"].items() >= config["lm"]["hf_config"].items()
    assert model.lm.causal_lm.config.num_hidden_layers >= 6
    size = model.config.vision.image_size
    images = np.zeros((1, model.config.cameras, size, size, 3), np.uint8)
    for task in TASK_SETS["mt10"]:
        state = model.lm_input(images, [INSTRUCTIONS[task]], np.zeros((1, 4), np.float32))
        assert state.layout.visual / state.layout.length >= 0.6, task
    flops = FlopRecorder()
    with torch.inference_mode():
        model.predict_action(images, [INSTRUCTIONS["pick-place-v3"]], np.zeros((1, 4), np.float32), timer=flops)
    stages = {k: v for k, v in flops.flops.items() if "." not in k}
    assert stages["lm"] / sum(stages.values()) >= 0.6


def test_package_assets_stay_under_40_mb() -> None:
    total = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert total < 40e6, f"src/vlaopt/assets holds {total / 1e6:.1f} MB"


def test_fast_medium_recipe_applies_to_medium() -> None:
    """configs/recipes/fast-medium.yaml: 50 of 200 visual tokens, 3 of 6 blocks, int8 linears; the result
    saves its recipe and predicts finite actions."""
    from vlaopt import apply, load_recipe
    from vlaopt.bench.heldout import HELDOUT_FILE, load_npz

    demos = load_npz(BUNDLED_MODELS["medium"] / HELDOUT_FILE)
    model = apply(VLA.from_pretrained("medium"), load_recipe(str(ROOT / "configs" / "recipes" / "fast-medium.yaml")),
                  calibration=demos.batches(8))
    assert [next(iter(step)) for step in model.config.recipe] == ["token_pruning", "layer_pruning", "quantize"]
    assert model.lm.causal_lm.config.num_hidden_layers == 3
    sample = demos.take(slice(0, 2))
    with torch.inference_mode():
        out = model.lm(model.lm_input(sample.images, sample.instructions, sample.proprio))
        actions = model.predict_action(sample.images, sample.instructions, sample.proprio)
    assert out.valid[:, out.layout.span("visual")].sum(1).tolist() == [50, 50]
    assert actions.shape == (2, 8, 4) and torch.isfinite(actions).all()
