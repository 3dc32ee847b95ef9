"""`vla-opt import` of pi0 (openpi's PyTorch port and LeRobot's): tiny checkpoints in their exact
layouts (scripts/tiny_checkpoint.py) against pi0's inference typed here from openpi's
pi0_pytorch.py: transformers' own SigLIP and Gemma modules, the prefix-LM and suffix masks of
`make_att_2d_masks`, the state token, the sine-cosine time embedding and Euler steps from t = 1."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GemmaConfig, GemmaModel, SiglipVisionConfig, SiglipVisionModel

import vlaopt
from vlaopt.cli import main
from vlaopt.config import VLAConfig
from vlaopt.importers import UnsupportedCheckpoint, import_checkpoint
from vlaopt.model.vla import VLA

_spec = importlib.util.spec_from_file_location("tiny", Path(__file__).parents[1] / "scripts" / "tiny_checkpoint.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)
PALI, EXPERT = tiny.PALI, tiny.EXPERT


def make_att_2d_masks(pad: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """big_vision's rule: a token sees valid tokens whose cumulative `att` is at most its own."""
    cum = torch.cumsum(att, dim=1)
    return (cum[:, None, :] <= cum[:, :, None]) & (pad[:, None, :] & pad[:, :, None])


def sincos(t: torch.Tensor, dim: int) -> torch.Tensor:
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    x = (1.0 / period * 2 * math.pi)[None] * t.double()[:, None]
    return torch.cat([x.sin(), x.cos()], 1).float()


def _gemma(sd: dict, prefix: str, width: int, mlp: int) -> GemmaModel:
    model = GemmaModel(GemmaConfig(vocab_size=600, hidden_size=width, intermediate_size=mlp, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=1, head_dim=16,
                                   hidden_act="gelu_pytorch_tanh")).eval()
    missing = model.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=False)
    assert missing.unexpected_keys == [] and set(missing.missing_keys) <= {"embed_tokens.weight"}
    return model


def ref_actions(src: Path, images: np.ndarray, instruction: str, state: np.ndarray, noise: torch.Tensor,
                lerobot: bool) -> torch.Tensor:
    """pi0's sample_actions on one observation: images (cams, H, W, 3) uint8, the robot's state (5,)."""
    sd = {k.removeprefix("model."): v for k, v in load_file(str(src / "model.safetensors")).items()}
    if lerobot:
        raw = load_file(str(next(src.glob("policy_preprocessor_step_*normalizer*"))))
        stats = {"state": {k: raw[f"observation.state.{k}"] for k in ("mean", "std")},
                 "actions": {k: raw[f"action.{k}"] for k in ("mean", "std")}}
        eps = 1e-8
    else:
        stats = {k: {s: torch.tensor(v[s]) for s in ("mean", "std")} for k, v in
                 json.loads((src / "assets/tiny_robot/norm_stats.json").read_text())["norm_stats"].items()}
        eps = 1e-6
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=16, image_size=28, patch_size=14)).eval()
    vt = PALI + "model.vision_tower.vision_model."
    vision.load_state_dict({k[len(vt):]: v for k, v in sd.items() if k.startswith(vt)}, strict=False)
    vlm = _gemma(sd, PALI + "model.language_model.", 64, 128)
    expert = _gemma(sd, EXPERT + "model.", 32, 96)

    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1  # [-1, 1]
        img = lin(PALI + "model.multi_modal_projector.linear", vision(pixel_values=pixels).last_hidden_state)
        img = img.reshape(1, -1, img.shape[-1])  # the images one after another
        tokenizer = tiny.build_builtin_tokenizer()
        text = instruction.strip().replace("_", " ").replace("\n", " ") + "\n"
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        lang = vlm.embed_tokens(torch.tensor([ids]))  # transformers scales Gemma's embedding by sqrt(width)
        prefix = torch.cat([img, lang], 1)
        n = prefix.shape[1]
        pad = torch.ones(1, n, dtype=torch.bool)
        mask = make_att_2d_masks(pad, torch.zeros(1, n, dtype=torch.long))  # prefix-LM: all see all
        out = vlm(inputs_embeds=prefix, attention_mask=mask[:, None], position_ids=torch.arange(n)[None], use_cache=True)
        cache = out.past_key_values
        s = (torch.tensor(state) - stats["state"]["mean"]) / (stats["state"]["std"] + eps)
        s = F.pad(s, (0, 32 - len(state)))[None]
        horizon = noise.shape[1]
        x, t, dt = noise.clone(), torch.tensor(1.0), torch.tensor(-0.1)
        att = torch.tensor([[1, 1] + [0] * (horizon - 1)])
        suffix_mask = make_att_2d_masks(torch.ones(1, horizon + 1, dtype=torch.bool), att)
        full = torch.cat([pad[:, None, :].expand(1, horizon + 1, n), suffix_mask], 2)[:, None]
        while t >= -dt / 2:
            a = lin("action_in_proj", x)
            mixed = lin("action_time_mlp_out", F.silu(lin("action_time_mlp_in", torch.cat(
                [a, sincos(t[None], a.shape[-1])[:, None].expand_as(a)], 2))))
            suffix = torch.cat([lin("state_proj", s)[:, None], mixed], 1)
            h = expert(inputs_embeds=suffix, attention_mask=full, position_ids=n + torch.arange(horizon + 1)[None],
                       cache=copy.deepcopy(cache)).last_hidden_state
            x = x + dt * lin("action_out_proj", h[:, -horizon:])
            t = t + dt
    act = stats["actions"]
    return torch.cat([x[0, :, :4] * (act["std"] + eps) + act["mean"], x[0, :, 4:]], 1)


def observation(seed: int = 0) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.normal(size=(1, tiny.HORIZON, 32)).astype(np.float32))
    return rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8), rng.normal(size=5).astype(np.float32), noise


@pytest.mark.parametrize("fmt", ["openpi-pytorch", "lerobot-pi0"])
def test_pi0_import_matches_openpi_inference(tmp_path, fmt):
    lerobot = fmt == "lerobot-pi0"
    src = tiny.write_pi0(tmp_path / "pi0", lerobot=lerobot)
    model = import_checkpoint(fmt, src, cameras=2)
    assert (model.config.head.state_token, model.config.prompt_style, model.config.full_attention) == (
        True, "paligemma", True)
    for seed, instruction in enumerate(["open the drawer", "pick_up the red block"]):
        images, state, noise = observation(seed)
        padded = np.zeros((1, 32), np.float32)
        padded[0, :5] = state
        ours = model.predict_action(images[None], [instruction], padded, noise=noise)[0]
        ref = ref_actions(src, images, instruction, state, noise, lerobot)
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=2e-4)


def test_cli_imports_pi0_and_the_saved_model_reloads(tmp_path, capsys):
    src = tiny.write_pi0(tmp_path / "pi0")
    out = tmp_path / "vla"
    assert main(["import", "--format", "openpi-pytorch", str(src), "--out", str(out), "--cameras", "2"]) == 0
    assert "expert head, chunk 6 x 32, proprio 32" in " ".join(capsys.readouterr().out.split())
    images, state, noise = observation()
    padded = np.zeros((1, 32), np.float32)
    padded[0, :5] = state
    torch.testing.assert_close(vlaopt.load(out).predict_action(images[None], ["open the drawer"], padded, noise=noise),
                               import_checkpoint("openpi-pytorch", src, cameras=2).predict_action(
                                   images[None], ["open the drawer"], padded, noise=noise), atol=1e-6, rtol=0)


def test_pi0_refusals_name_the_part(tmp_path):
    src = tiny.write_pi0(tmp_path / "pi0")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "paligemma_variant": "gemma_7b"}))
    with pytest.raises(UnsupportedCheckpoint, match="^Gemma variant 'gemma_7b' is not supported; expected one of"):
        import_checkpoint("openpi-pytorch", src)
    lerobot = tiny.write_pi0(tmp_path / "lerobot", lerobot=True)
    cfg = json.loads((lerobot / "config.json").read_text())
    (lerobot / "config.json").write_text(json.dumps({**cfg, "type": "smolvla"}))
    with pytest.raises(UnsupportedCheckpoint, match=r"config.json has type 'smolvla', expected 'pi0'$"):
        import_checkpoint("lerobot-pi0", lerobot)


# ---- the new config options, each alone --------------------------------------------------------------
def _tiny(**fields):
    from dataclasses import replace

    return replace(VLAConfig.tiny(lm="gemma", head="expert", proprio_dim=3), **fields)


def test_paligemma_prompt_puts_the_images_first_and_bos_before_the_text():
    model = VLA(_tiny(prompt_style="paligemma")).eval()
    state = model.lm_input(*tiny_inputs(model))
    assert state.layout.span("visual") == slice(0, model.config.num_visual_tokens)
    ids = model.processor.tokens("pick_up it")
    assert ids[0] == model.bos_id and model.tokenizer.decode(ids[1:]) == "pick up it\n"


def test_linear_projector_and_mean_std_normalization():
    model = VLA(_tiny(projector="linear", normalization="mean_std")).eval()
    assert isinstance(model.projector, torch.nn.Linear)
    model.set_stats({"action": {"mean": [1.0] * 7, "std": [2.0] * 7}, "proprio": {"mean": [0.0] * 3, "std": [1.0] * 3}})
    torch.testing.assert_close(model.unnormalize(torch.ones(1, 4, 7)), torch.full((1, 4, 7), 3.0 + 1e-6))
    with pytest.raises(ValueError, match=r"^action statistics lack 'mean'; got keys \['q01', 'q99'\]$"):
        model.set_stats({"action": {"q01": [0] * 7, "q99": [1] * 7}})


def test_state_token_feeds_the_proprio_to_the_expert_only():
    from dataclasses import replace

    cfg = _tiny()
    cfg.head = replace(cfg.head, state_token=True)
    model = VLA(cfg).eval()
    assert model.proprio_projector is None and model.head.state_in is not None
    images, instructions, proprio = tiny_inputs(model)
    noise = torch.randn(1, cfg.chunk, cfg.action_dim)
    a = model.predict_action(images, instructions, proprio, noise=noise)
    b = model.predict_action(images, instructions, proprio + 1, noise=noise)
    assert not torch.allclose(a, b)  # the state changes the actions
    assert model.lm_input(images, instructions, proprio).layout.proprio == 0  # and is not in the prefix


def test_pi0_convention_reverses_time_and_velocity():
    """Our integrator with convention pi0 takes openpi's Euler steps: x += -0.1 v(x, t), t = 1, 0.9, ..."""
    from dataclasses import replace

    cfg = _tiny()
    cfg.head = replace(cfg.head, convention="pi0")
    model = VLA(cfg).eval()
    head = model.head
    seen = []
    original = head.action_in.forward
    head.action_in.forward = lambda x, t: seen.append(float(t[0])) or original(x, t)
    model.predict_action(*tiny_inputs(model))
    assert seen == pytest.approx([1 - i / cfg.head.steps for i in range(cfg.head.steps)])


def tiny_inputs(model: VLA) -> tuple[np.ndarray, list[str], np.ndarray]:
    cfg = model.config
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, cfg.cameras, cfg.vision.image_size, cfg.vision.image_size, 3), dtype=np.uint8)
    return images, ["open the drawer"], rng.normal(size=(1, cfg.proprio_dim)).astype(np.float32)
