"""pi0 checkpoints, from openpi's PyTorch port (`openpi-pytorch`) or LeRobot (`lerobot-pi0`), as vla-opt models.

Both hold one `PI0Pytorch` state dict (LeRobot's under `model.`):

    paligemma_with_expert.paligemma.model.vision_tower.*     SigLIP (transformers naming)
    paligemma_with_expert.paligemma.model.multi_modal_projector.linear
    paligemma_with_expert.paligemma.model.language_model.*   Gemma (the VLM)
    paligemma_with_expert.gemma_expert.model.*               Gemma (the action expert)
    state_proj, action_in_proj, action_time_mlp_in/out, action_out_proj

openpi's folder adds config.json (action_dim, action_horizon, the Gemma variants) and
assets/<asset id>/norm_stats.json; LeRobot's adds config.json (`type: pi0`, chunk_size,
num_inference_steps, the features) and the normalizer statistics of its processor files
(policy_preprocessor_step_*_normalizer_processor.safetensors).

pi0 as vla-opt builds it: images first, then [BOS] instruction "\\n" (`prompt_style: paligemma`),
with full attention over that prefix (`full_attention`); PaliGemma's linear projector; the expert
reads every VLM layer's KV as ours does, with the state as its first token (`head.state_token`),
openpi's time embedding and time direction (`head.convention: pi0`); z-score statistics
(`normalization: mean_std`). State and actions keep pi0's padded width (max_state_dim /
max_action_dim, 32): pass the state zero-padded, read the first dims of the actions. The padded
dimensions are left unnormalized. Cameras are the images pi0 does not mask: a masked image (openpi's
missing wrist camera, LeRobot's `empty_cameras`) neither is attended to nor takes a position, so
leaving it out gives the same actions. Refused by name: pi0.5 (adaRMS time conditioning) and
checkpoints without a readable tokenizer (the Gemma tokenizer is not bundled: pass `tokenizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file

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
from vlaopt.model.vla import VLA

GEMMA_HEADS = {"gemma_2b": (8, 1, 256), "gemma_300m": (8, 1, 256), "gemma_2b_lora": (8, 1, 256),
               "gemma_300m_lora": (8, 1, 256), "dummy": (8, 1, 16)}
"""openpi's Gemma variants -> (heads, key/value heads, head_dim): what the weights cannot tell."""
SIGLIP_HEADS = 16  # PaliGemma's SigLIP-So400m
PALI = "paligemma_with_expert.paligemma."
EXPERT = "paligemma_with_expert.gemma_expert."
HEAD_KEYS = {"action_in_proj": "head.action_in.action", "action_time_mlp_in": "head.action_in.mix.0",
             "action_time_mlp_out": "head.action_in.mix.2", "action_out_proj": "head.action_out",
             "state_proj": "head.state_in"}


def _language_prefix(weights: WeightMap) -> str:
    """transformers >= 4.52 nests the Gemma under `model.language_model`; older ports under `language_model.model`."""
    for prefix in (PALI + "model.language_model.", PALI + "language_model.model."):
        if any(k.startswith(prefix) for k in weights.left):
            return prefix
    raise UnsupportedCheckpoint(f"{weights.source} has no PaliGemma language model ({PALI}model.language_model.*)")


def _gemma_config(weights: WeightMap, prefix: str, variant: str) -> dict[str, Any]:
    if variant not in GEMMA_HEADS:
        raise UnsupportedCheckpoint(f"Gemma variant {variant!r} is not supported; expected one of {', '.join(GEMMA_HEADS)}")
    heads, kv_heads, head_dim = GEMMA_HEADS[variant]
    q = weights.peek(prefix + "layers.0.self_attn.q_proj.weight")
    if q.shape[0] != heads * head_dim:
        raise UnsupportedCheckpoint(f"{prefix}layers.0.self_attn.q_proj has {q.shape[0]} outputs, not the {heads} x "
                                    f"{head_dim} of Gemma variant {variant!r}")
    return {"model_type": "gemma", "hidden_size": q.shape[1], "num_hidden_layers": layer_count(weights, prefix + "layers."),
            "intermediate_size": weights.peek(prefix + "layers.0.mlp.gate_proj.weight").shape[0],
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


def padded_stats(stats: dict[str, Any], width: int, name: str) -> dict[str, Any]:
    """z-score statistics padded to the model's `width` (padded dimensions pass through unnormalized)."""
    mean, std = list(map(float, stats["mean"])), list(map(float, stats["std"]))
    if len(mean) > width or len(std) != len(mean):
        raise UnsupportedCheckpoint(f"{name} statistics have {len(mean)} dims, more than the model's {width}")
    pad = width - len(mean)
    return {"mean": mean + [0.0] * pad, "std": std + [1.0] * pad, "mask": [True] * len(mean) + [False] * pad}


def build_pi0(weights: WeightMap, *, chunk: int, steps: int, variants: tuple[str, str], stats: dict[str, Any],
              tokenizer_dir: Path, cameras: int) -> VLA:
    """The VLA of a PI0Pytorch state dict (keys without LeRobot's `model.`); see the module docstring."""
    if weights.has("time_mlp_in.weight"):
        raise UnsupportedCheckpoint("time_mlp_in: a pi0.5 checkpoint (adaRMS time conditioning in the expert) is not "
                                    "supported, only pi0")
    vt = next((p for p in (PALI + "model.vision_tower.vision_model.", PALI + "vision_tower.vision_model.")
               if weights.has(p + "embeddings.patch_embedding.weight")), None)
    if vt is None:
        raise UnsupportedCheckpoint(f"{weights.source} has no SigLIP vision tower ({PALI}model.vision_tower.*)")
    patch = weights.peek(vt + "embeddings.patch_embedding.weight")
    positions, width = weights.peek(vt + "embeddings.position_embedding.weight").shape
    side = round(positions ** 0.5)
    vision = VisionConfig(kind="siglip", image_size=side * patch.shape[-1], patch_size=patch.shape[-1],
                          hidden_size=width, num_layers=layer_count(weights, vt + "encoder.layers."),
                          num_heads=SIGLIP_HEADS,
                          intermediate_size=weights.peek(vt + "encoder.layers.0.mlp.fc1.weight").shape[0])
    lang = _language_prefix(weights)
    text = _gemma_config(weights, lang, variants[0])
    text["vocab_size"] = weights.peek(lang + "embed_tokens.weight").shape[0]
    expert = _gemma_config(weights, EXPERT + "model.", variants[1])
    if expert["num_hidden_layers"] != text["num_hidden_layers"]:
        raise UnsupportedCheckpoint(f"the expert has {expert['num_hidden_layers']} layers and the VLM "
                                    f"{text['num_hidden_layers']}: vla-opt pairs expert layer i with VLM layer i")
    action_dim, expert_width = weights.peek("action_out_proj.weight").shape
    head = ExpertHeadConfig(kind="expert", hidden_dim=expert_width, steps=steps, kv_layers="all", state_token=True,
                            convention="pi0", mlp_dim=expert["intermediate_size"])
    config = VLAConfig(vision=vision, lm=LMConfig(hf_config=text), head=head, cameras=cameras,
                       proprio_dim=weights.peek("state_proj.weight").shape[1], action_dim=action_dim, chunk=chunk,
                       full_attention=True, clip_actions=False, prompt_style="paligemma", projector="linear",
                       normalization="mean_std")
    tokenizer = source_tokenizer(tokenizer_dir, "pi0 uses PaliGemma's Gemma tokenizer: pass its local folder as "
                                                "tokenizer")
    model = VLA(config, tokenizer=tokenizer, load_lm_weights=False)
    model.set_stats({"action": padded_stats(stats["action"], action_dim, "action"),
                     "proprio": padded_stats(stats["proprio"], config.proprio_dim, "state")})

    weights.move_prefix(vt, "vision.backbones.siglip.")
    projector = PALI + ("model." if vt.startswith(PALI + "model.") else "") + "multi_modal_projector.linear."
    weights.move_prefix(projector, "projector.")
    weights.move_prefix(lang, "lm.causal_lm.model.")
    weights.drop([PALI + "lm_head.", EXPERT + "lm_head."])  # tied to the embedding / no token output
    weights.move_prefix(EXPERT + "model.", "head.expert.")
    for theirs, ours in HEAD_KEYS.items():
        for p in ("weight", "bias"):
            weights.move(f"{theirs}.{p}", f"{ours}.{p}")
    load_into(model, [weights], own=("action_norm.", "proprio_norm.", "vision.backbones.siglip.head."))
    return model.eval()


def _openpi_stats(src: Path, asset: str | None) -> dict[str, Any]:
    found = sorted(src.glob("assets/*/norm_stats.json"))
    if asset is not None:
        found = [p for p in found if p.parent.name == asset]
    if len(found) != 1:
        names = ", ".join(p.parent.name for p in sorted(src.glob("assets/*/norm_stats.json"))) or "none"
        raise UnsupportedCheckpoint(f"expected one assets/<asset id>/norm_stats.json in {src} (found: {names}); "
                                    "choose one with asset")
    stats = read_json(found[0]).get("norm_stats", {})
    missing = [k for k in ("state", "actions") if k not in stats]
    if missing:
        raise UnsupportedCheckpoint(f"{found[0]} lacks norm_stats.{missing[0]}")
    return {"proprio": stats["state"], "action": stats["actions"]}


@IMPORTERS.register("openpi-pytorch")
def import_openpi(src: str | Path, steps: int = 10, cameras: int = 3, tokenizer: str | None = None,
                  asset: str | None = None) -> VLA:
    """openpi's PyTorch pi0 folder (examples/convert_jax_model_to_pytorch.py's output); `steps` flow
    steps (openpi's default 10), `cameras` images (base and two wrists), `asset` the norm_stats folder."""
    src = Path(src)
    cfg = read_json(src / "config.json")
    weights = WeightMap(read_safetensors(src), f"{src}/model.safetensors")
    variants = (cfg.get("paligemma_variant", "gemma_2b"), cfg.get("action_expert_variant", "gemma_300m"))
    return build_pi0(weights, chunk=int(cfg.get("action_horizon", 50)), steps=steps, variants=variants,
                     stats=_openpi_stats(src, asset), tokenizer_dir=Path(tokenizer or src), cameras=cameras)


def lerobot_stats(src: Path) -> dict[str, Any]:
    """The state / action mean and std of LeRobot's normalizer processor step."""
    files = sorted(src.glob("policy_preprocessor_step_*normalizer_processor.safetensors"))
    if not files:
        raise UnsupportedCheckpoint(f"{src} has no policy_preprocessor_step_*_normalizer_processor.safetensors "
                                    "(LeRobot's normalizer statistics)")
    tensors = load_file(str(files[0]))
    out = {}
    for ours, theirs in (("proprio", "observation.state"), ("action", "action")):
        try:
            out[ours] = {k: tensors[f"{theirs}.{k}"].tolist() for k in ("mean", "std")}
        except KeyError as exc:
            raise UnsupportedCheckpoint(f"{files[0].name} lacks {exc.args[0]}") from exc
    return out


@IMPORTERS.register("lerobot-pi0")
def import_lerobot_pi0(src: str | Path, cameras: int | None = None, tokenizer: str | None = None) -> VLA:
    """A LeRobot pi0 policy folder (`save_pretrained`: config.json, model.safetensors, processor files)."""
    src = Path(src)
    cfg = read_json(src / "config.json")
    if cfg.get("type") != "pi0":
        raise UnsupportedCheckpoint(f"{src}/config.json has type {cfg.get('type')!r}, expected 'pi0'")
    modes = cfg.get("normalization_mapping", {})
    for group in ("STATE", "ACTION"):
        if modes.get(group, "MEAN_STD") != "MEAN_STD":
            raise UnsupportedCheckpoint(f"normalization_mapping.{group}={modes[group]!r}: only MEAN_STD is supported")
    tensors = read_safetensors(src)
    if any(not k.startswith("model.") for k in tensors):
        bad = next(k for k in tensors if not k.startswith("model."))
        raise UnsupportedCheckpoint(f"{src}/model.safetensors: tensor {bad} is outside the policy's `model.`")
    weights = WeightMap({k.removeprefix("model."): v for k, v in tensors.items()}, f"{src}/model.safetensors")
    images = [k for k, f in cfg.get("input_features", {}).items() if f.get("type") == "VISUAL"]
    return build_pi0(weights, chunk=int(cfg.get("chunk_size", 50)), steps=int(cfg.get("num_inference_steps", 10)),
                     variants=(cfg.get("paligemma_variant", "gemma_2b"), cfg.get("action_expert_variant", "gemma_300m")),
                     stats=lerobot_stats(src), tokenizer_dir=Path(tokenizer or src),
                     cameras=cameras or len(images) or 1)


