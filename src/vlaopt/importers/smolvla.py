"""LeRobot SmolVLA checkpoints (`lerobot-smolvla`) as vla-opt models.

The folder (`SmolVLAPolicy.save_pretrained`) holds config.json (`type: smolvla`, chunk_size, num_steps,
attention_mode, self_attn_every_n_layers, vlm_model_name, the features), model.safetensors and the
processor's normalizer statistics:

    model.vlm_with_expert.vlm.model.vision_model.*          SmolVLM's SigLIP-style vision encoder
    model.vlm_with_expert.vlm.model.connector.modality_projection.proj    after the pixel shuffle
    model.vlm_with_expert.vlm.model.text_model.*            SmolLM2 (Llama), its first num_vlm_layers
    model.vlm_with_expert.lm_expert.*                       the expert: a narrower Llama
    model.state_proj, action_in_proj, action_time_mlp_in/out, action_out_proj

SmolVLA as vla-opt builds it: images first (SigLIP features, `pixel_shuffle` by SmolVLM's
scale_factor, the bias-free linear connector), then the instruction and "\\n" without BOS
(`prompt_style: smolvla`), then the state through a linear projection (`proprio_position:
after_prompt`, `proprio_projector: linear`); images and text scaled by sqrt(width) (`embed_scale`);
full attention over images and text, the state a later block (`proprio_block`); RoPE with base 10000
in the VLM and the expert, as SmolVLA's own apply_rope whatever the VLM's config says; the expert's
even layers attend to the VLM cache and the chunk, its odd ones cross-attend to the VLM layer's
keys/values through their own k/v projections (`head.self_attn_every`), chunk tokens causal among
themselves (`head.causal_actions`), openpi's time convention (`head.convention: pi0`), z-score
statistics. State and actions keep the padded width (max_state_dim / max_action_dim).

The checkpoint does not store the VLM's architecture (it names it, vlm_model_name, for the Hub) nor
its tokenizer: pass `vlm_config` (that model's config.json) and `tokenizer` (its folder). Refused by
name: add_image_special_tokens, an expert with fewer layers than the VLM, attention modes other than
cross_attn / self_attn.
"""

from __future__ import annotations

from pathlib import Path

from vlaopt.config import ExpertHeadConfig, LMConfig, VisionConfig, VLAConfig
from vlaopt.importers.base import (
    IMPORTERS,
    UnsupportedCheckpoint,
    WeightMap,
    layer_count,
    load_into,
    read_json,
    read_safetensors,
    source_tokenizer,
)
from vlaopt.importers.pi0 import HEAD_KEYS, lerobot_stats, padded_stats
from vlaopt.model.vla import VLA

VLM = "vlm_with_expert.vlm."
EXPERT = "vlm_with_expert.lm_expert."
SIGLIP_DEFAULTS = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}  # what our SigLIP builds with


def _vlm_config(path: str | None, name: str) -> dict:
    if path is None:
        raise UnsupportedCheckpoint(f"SmolVLA checkpoints do not store the VLM's architecture; pass vlm_config: the "
                                    f"config.json of {name}")
    cfg = read_json(Path(path))
    if "vision_config" not in cfg or "text_config" not in cfg:
        raise UnsupportedCheckpoint(f"{path} is not a SmolVLM config (no vision_config / text_config)")
    return cfg


@IMPORTERS.register("lerobot-smolvla")
def import_smolvla(src: str | Path, vlm_config: str | None = None, tokenizer: str | None = None,
                   cameras: int | None = None) -> VLA:
    """A LeRobot SmolVLA policy folder; see the module docstring."""
    src = Path(src)
    cfg = read_json(src / "config.json")
    if cfg.get("type") != "smolvla":
        raise UnsupportedCheckpoint(f"{src}/config.json has type {cfg.get('type')!r}, expected 'smolvla'")
    if cfg.get("add_image_special_tokens"):
        raise UnsupportedCheckpoint("add_image_special_tokens=true (image start/end tokens) is not supported")
    mode = cfg.get("attention_mode", "cross_attn")
    if mode not in ("cross_attn", "self_attn"):
        raise UnsupportedCheckpoint(f"attention_mode={mode!r} is not supported (cross_attn, self_attn)")
    vlm = _vlm_config(vlm_config, cfg.get("vlm_model_name", "the VLM"))
    vision_cfg, text_cfg = vlm["vision_config"], dict(vlm["text_config"])
    odd = {k: vision_cfg[k] for k, v in SIGLIP_DEFAULTS.items() if vision_cfg.get(k, v) != v}
    if odd:
        raise UnsupportedCheckpoint(f"the VLM's vision encoder uses {odd}; vla-opt's SigLIP builds with {SIGLIP_DEFAULTS}")

    tensors = read_safetensors(src)
    outside = [k for k in tensors if not k.startswith("model.")]
    if outside:
        raise UnsupportedCheckpoint(f"{src}/model.safetensors: tensor {outside[0]} is outside the policy's `model.`")
    weights = WeightMap({k.removeprefix("model."): v for k, v in tensors.items()}, f"{src}/model.safetensors")
    vt, text = VLM + "model.vision_model.", VLM + "model.text_model."
    vision = VisionConfig(kind="siglip", image_size=vision_cfg["image_size"], patch_size=vision_cfg["patch_size"],
                          hidden_size=vision_cfg["hidden_size"], num_layers=layer_count(weights, vt + "encoder.layers."),
                          num_heads=vision_cfg["num_attention_heads"], intermediate_size=vision_cfg["intermediate_size"])
    depth = layer_count(weights, text + "layers.")
    text_cfg.update(model_type="llama", num_hidden_layers=depth, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 10000.0})
    text_cfg.pop("rope_theta", None), text_cfg.pop("rope_scaling", None)
    text_cfg["tie_word_embeddings"] = not weights.has(VLM + "lm_head.weight")
    expert_depth = layer_count(weights, EXPERT + "layers.")
    if expert_depth != depth:
        raise UnsupportedCheckpoint(f"the expert has {expert_depth} layers and the VLM {depth}: vla-opt pairs expert "
                                    "layer i with VLM layer i (num_expert_layers must be -1)")
    every = int(cfg.get("self_attn_every_n_layers", 2)) if mode == "cross_attn" else 1
    head = ExpertHeadConfig(kind="expert", hidden_dim=weights.peek(EXPERT + "norm.weight").shape[0],
                            steps=int(cfg.get("num_steps", 10)), kv_layers="all", convention="pi0",
                            mlp_dim=weights.peek(EXPERT + "layers.0.mlp.gate_proj.weight").shape[0],
                            self_attn_every=max(every, 1), causal_actions=True)
    images = [k for k, f in cfg.get("input_features", {}).items() if f.get("type") == "VISUAL"]
    config = VLAConfig(
        vision=vision, lm=LMConfig(hf_config=text_cfg), head=head, cameras=cameras or len(images) or 1,
        proprio_dim=weights.peek("state_proj.weight").shape[1], action_dim=weights.peek("action_out_proj.weight").shape[0],
        chunk=int(cfg.get("chunk_size", 50)), full_attention=True, clip_actions=False, prompt_style="smolvla",
        projector="linear", proprio_projector="linear", pixel_shuffle=int(vlm.get("scale_factor", 1)),
        embed_scale=True, proprio_position="after_prompt", proprio_block=True, normalization="mean_std")
    tok = source_tokenizer(Path(tokenizer or src), "SmolVLA uses its VLM's tokenizer: pass its local folder as "
                                                   "tokenizer")
    model = VLA(config, tokenizer=tok, load_lm_weights=False)
    stats = lerobot_stats(src)
    model.set_stats({"action": padded_stats(stats["action"], config.action_dim, "action"),
                     "proprio": padded_stats(stats["proprio"], config.proprio_dim, "state")})

    weights.move_prefix(vt, "vision.backbones.siglip.")
    connector = weights.peek(VLM + "model.connector.modality_projection.proj.weight")
    weights.move(VLM + "model.connector.modality_projection.proj.weight", "projector.weight")
    weights.add("projector.bias", connector.new_zeros(connector.shape[0]), "zeros: SmolVLM's connector has no bias")
    weights.move_prefix(text, "lm.causal_lm.model.")
    if weights.has(VLM + "lm_head.weight"):
        weights.move(VLM + "lm_head.weight", "lm.causal_lm.lm_head.weight")
    weights.move_prefix(EXPERT, "head.expert.")
    for theirs, ours in {**HEAD_KEYS, "state_proj": "proprio_projector"}.items():
        for p in ("weight", "bias"):
            weights.move(f"{theirs}.{p}", f"{ours}.{p}")
    load_into(model, [weights], own=("action_norm.", "proprio_norm.", "vision.backbones.siglip.head."))
    return model.eval()
