"""`vla-opt import --format lerobot-smolvla`: a tiny checkpoint in LeRobot's exact layout
(scripts/tiny_checkpoint.py) against SmolVLA's inference typed here from LeRobot's
modeling_smolvla.py / smolvlm_with_expert.py: transformers' own SmolVLM vision encoder and connector
and Llama for the prefix, then the expert loop written out (their RoPE, joint self-attention layers,
cross-attention layers re-projecting the VLM's keys/values, eager attention), with Euler steps from t = 1."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaModel, SmolVLMModel

from vlaopt.config import VLAConfig
from vlaopt.importers import UnsupportedCheckpoint, import_checkpoint
from vlaopt.model.vision import pixel_shuffle
from vlaopt.model.vla import VLA

_spec = importlib.util.spec_from_file_location("tiny", Path(__file__).parents[1] / "scripts" / "tiny_checkpoint.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


def make_att_2d_masks(pad: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    cum = torch.cumsum(att, dim=1)
    return (cum[:, None, :] <= cum[:, :, None]) & (pad[:, None, :] & pad[:, :, None])


def apply_rope(x: torch.Tensor, positions: torch.Tensor, max_wavelength: float = 10_000) -> torch.Tensor:
    """SmolVLA's RoPE of x (B, L, H, D) at positions (B, L)."""
    half = x.shape[-1] // 2
    timescale = max_wavelength ** ((2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32))
    radians = (positions[..., None].float() / timescale)[..., None, :]
    x1, x2 = x.split(half, dim=-1)
    return torch.cat([x1 * radians.cos() - x2 * radians.sin(), x2 * radians.cos() + x1 * radians.sin()], -1)


def eager(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """SmolVLA's eager attention: q (B, T, H, D), k / v (B, S, KV, D) repeated to H heads, mask (B, T, S)."""
    b, s, kv, d = k.shape
    k = k[:, :, :, None].expand(b, s, kv, heads // kv, d).reshape(b, s, heads, d)
    v = v[:, :, :, None].expand(b, s, kv, heads // kv, d).reshape(b, s, heads, d)
    w = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) * d ** -0.5
    w = torch.where(mask[:, None], w, torch.finfo(w.dtype).min).softmax(-1)
    return (w @ v.transpose(1, 2)).transpose(1, 2).reshape(b, -1, heads * d)


def sincos(t: torch.Tensor, dim: int) -> torch.Tensor:
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    x = (2 * math.pi / (4e-3 * (4.0 / 4e-3) ** fraction))[None] * t.double()[:, None]
    return torch.cat([x.sin(), x.cos()], 1).float()


def ref_actions(src: Path, images: np.ndarray, instruction: str, state: np.ndarray, noise: torch.Tensor) -> torch.Tensor:
    """SmolVLA's sample_actions on one observation: images (cams, H, W, 3) uint8, the robot's state."""
    sd = {k.removeprefix("model."): v for k, v in load_file(str(src / "model.safetensors")).items()}
    raw = load_file(str(next(src.glob("policy_preprocessor_step_*normalizer*"))))
    cfg = tiny.smolvlm_config()
    vlm = SmolVLMModel(cfg).eval()
    vlm.load_state_dict({k[len(tiny.SMOL_VLM + "model."):]: v for k, v in sd.items()
                         if k.startswith(tiny.SMOL_VLM + "model.")})
    text = LlamaConfig(**{**cfg.text_config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    llm = LlamaModel(text).eval()  # SmolVLA's own RoPE uses base 10000 whatever the VLM's config says
    llm.load_state_dict(vlm.text_model.state_dict())
    exp = {k[len(tiny.SMOL_EXPERT):]: v for k, v in sd.items() if k.startswith(tiny.SMOL_EXPERT)}

    def lin(w: dict, name: str, x: torch.Tensor) -> torch.Tensor:
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        img = vlm.connector(vlm.vision_model(pixel_values=pixels).last_hidden_state)
        img = img.reshape(1, -1, img.shape[-1]) * math.sqrt(img.shape[-1])
        tokenizer = tiny.build_builtin_tokenizer()
        lang = vlm.text_model.embed_tokens(torch.tensor([tokenizer(instruction + "\n", add_special_tokens=False)[
            "input_ids"]])) * math.sqrt(text.hidden_size)
        s = (torch.tensor(state) - raw["observation.state.mean"]) / (raw["observation.state.std"] + 1e-8)
        s = F.pad(s, (0, 32 - len(state)))[None]
        prefix = torch.cat([img, lang, lin(sd, "state_proj", s)[:, None]], 1)
        n = prefix.shape[1]
        pad = torch.ones(1, n, dtype=torch.bool)
        att = torch.zeros(1, n, dtype=torch.long)
        att[0, -1] = 1  # the state is a later block
        out = llm(inputs_embeds=prefix, attention_mask=make_att_2d_masks(pad, att)[:, None],
                  position_ids=torch.arange(n)[None], use_cache=True)
        cache = [(layer.keys.transpose(1, 2), layer.values.transpose(1, 2)) for layer in out.past_key_values.layers]
        horizon, heads, hd = noise.shape[1], text.num_attention_heads, text.head_dim
        own = make_att_2d_masks(torch.ones(1, horizon, dtype=torch.bool), torch.ones(1, horizon, dtype=torch.long))
        x, t, dt = noise.clone(), torch.tensor(1.0), torch.tensor(-0.1)
        while t >= -dt / 2:
            a = lin(sd, "action_in_proj", x)
            h = lin(sd, "action_time_mlp_out", F.silu(lin(sd, "action_time_mlp_in", torch.cat(
                [a, sincos(t[None], a.shape[-1])[:, None].expand_as(a)], 2))))
            positions = n + torch.arange(horizon)[None]
            for i, (keys, values) in enumerate(cache):
                p = f"layers.{i}."
                y = rms(h, exp[p + "input_layernorm.weight"])
                q = lin(exp, p + "self_attn.q_proj", y).view(1, horizon, -1, hd)
                if i % 2 == 0:  # self-attention: the cached prefix, then the chunk (causal)
                    k = apply_rope(lin(exp, p + "self_attn.k_proj", y).view(1, horizon, -1, hd), positions)
                    v = lin(exp, p + "self_attn.v_proj", y).view(1, horizon, -1, hd)
                    o = eager(torch.cat([pad[:, None].expand(1, horizon, n), own], 2), apply_rope(q, positions),
                              torch.cat([keys, k], 1), torch.cat([values, v], 1), heads)
                else:  # cross-attention: the VLM's keys / values through the expert's projections
                    k = lin(exp, p + "self_attn.k_proj", keys.reshape(1, n, -1)).view(1, n, -1, hd)
                    v = lin(exp, p + "self_attn.v_proj", values.reshape(1, n, -1)).view(1, n, -1, hd)
                    o = eager(pad[:, None].expand(1, horizon, n), apply_rope(q, positions - n), k, v, heads)
                h = h + lin(exp, p + "self_attn.o_proj", o)
                y = rms(h, exp[p + "post_attention_layernorm.weight"])
                h = h + lin(exp, p + "mlp.down_proj", F.silu(lin(exp, p + "mlp.gate_proj", y)) *
                            lin(exp, p + "mlp.up_proj", y))
            x = x + dt * lin(sd, "action_out_proj", rms(h, exp["norm.weight"]))
            t = t + dt
    mean, std = raw["action.mean"], raw["action.std"]
    return torch.cat([x[0, :, :4] * (std + 1e-8) + mean, x[0, :, 4:]], 1)


def observation(seed: int = 0) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.normal(size=(1, tiny.SMOL_HORIZON, 32)).astype(np.float32))
    return rng.integers(0, 256, (2, 56, 56, 3), dtype=np.uint8), rng.normal(size=5).astype(np.float32), noise


def test_smolvla_import_matches_lerobot_inference(tmp_path):
    src = tiny.write_smolvla(tmp_path / "smolvla")
    model = import_checkpoint("lerobot-smolvla", src, vlm_config=str(src / "vlm_config.json"))
    assert model.config.num_visual_tokens == 8  # 2 cameras x (4 x 4 patches / 2 x 2)
    for seed, instruction in enumerate(["open the drawer", "Push the button"]):
        images, state, noise = observation(seed)
        padded = np.zeros((1, 32), np.float32)
        padded[0, :5] = state
        ours = model.predict_action(images[None], [instruction], padded, noise=noise)[0]
        torch.testing.assert_close(ours, ref_actions(src, images, instruction, state, noise), atol=2e-4, rtol=2e-4)


def test_smolvla_needs_the_vlm_config_and_refuses_image_special_tokens(tmp_path):
    src = tiny.write_smolvla(tmp_path / "smolvla")
    with pytest.raises(UnsupportedCheckpoint, match=r"^SmolVLA checkpoints do not store the VLM's architecture; pass "
                                                    r"vlm_config: the config.json of HuggingFaceTB/SmolVLM2-500M"):
        import_checkpoint("lerobot-smolvla", src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "add_image_special_tokens": True}))
    with pytest.raises(UnsupportedCheckpoint, match=r"^add_image_special_tokens=true"):
        import_checkpoint("lerobot-smolvla", src, vlm_config=str(src / "vlm_config.json"))


# ---- the new config options, each alone --------------------------------------------------------------
def test_pixel_shuffle_matches_transformers_smolvlm_connector():
    connector = SmolVLMModel(tiny.smolvlm_config()).connector
    patches = torch.randn(3, 16, 32)
    ours = pixel_shuffle(patches.reshape(1, 48, 32), cameras=3, factor=2).reshape(3, 4, 128)
    torch.testing.assert_close(connector.modality_projection(ours), connector(patches))


def _tiny(**fields) -> VLAConfig:
    from dataclasses import replace

    return replace(VLAConfig.tiny(head="expert", proprio_dim=3), **fields)


def test_proprio_after_the_prompt_in_its_own_block():
    model = VLA(_tiny(proprio_position="after_prompt", full_attention=True, proprio_block=True)).eval()
    images = np.random.default_rng(0).integers(0, 256, (1, 1, 32, 32, 3), dtype=np.uint8)
    state = model.lm_input(images, ["open it"], np.zeros((1, 3), np.float32))
    span, prompt = state.layout.span("proprio"), state.layout.span("prompt")
    assert span.start == prompt.stop
    allowed = state.attention_mask()[0, 0]
    assert allowed[span.start].all() and not allowed[: span.start, span.start].any()  # sees all, seen by none before


def test_embed_scale_multiplies_visual_and_text_embeddings():
    plain, scaled = VLA(_tiny()).eval(), VLA(_tiny(embed_scale=True)).eval()
    images = np.random.default_rng(0).integers(0, 256, (1, 1, 32, 32, 3), dtype=np.uint8)
    a, b = (m.lm_input(images, ["open it"], np.zeros((1, 3), np.float32)) for m in (plain, scaled))
    width = plain.lm.hidden_size
    for name in ("visual", "prompt"):
        torch.testing.assert_close(b.hidden[:, a.layout.span(name)], a.hidden[:, a.layout.span(name)] * width ** 0.5)
    torch.testing.assert_close(b.hidden[:, a.layout.span("proprio")], a.hidden[:, a.layout.span("proprio")])


def test_cross_attention_expert_layers_read_only_the_vlm_keys():
    from dataclasses import replace

    cfg = _tiny()
    cfg.head = replace(cfg.head, self_attn_every=2, causal_actions=True)
    model = VLA(cfg).eval()
    kv = model.lm.causal_lm.config.num_key_value_heads * model.lm.causal_lm.config.head_dim
    assert model.head.cross == [False, True] and model.head.expert.layers[1].self_attn.k_proj.in_features == kv
    images = np.random.default_rng(0).integers(0, 256, (1, 1, 32, 32, 3), dtype=np.uint8)
    noise = torch.randn(1, cfg.chunk, cfg.action_dim)
    first = model.predict_action(images, ["open it"], np.zeros((1, 3), np.float32), noise=noise)
    later = noise.clone()
    later[:, -1] += 1  # a causal chunk: the last token cannot change the first's velocity
    second = model.predict_action(images, ["open it"], np.zeros((1, 3), np.float32), noise=later)
    assert torch.allclose(first[:, 0], second[:, 0], atol=1e-6) and not torch.allclose(first[:, -1], second[:, -1])
