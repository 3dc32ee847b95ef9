"""Write tiny random checkpoints in the exact layouts other projects save, for tests and for trying
`vla-opt import` without a multi-GB download:

    python scripts/tiny_checkpoint.py oft runs/tiny-oft [--single] [--no-proprio]
    python scripts/tiny_checkpoint.py openpi-pytorch runs/tiny-pi0
    python scripts/tiny_checkpoint.py lerobot-pi0 runs/tiny-pi0-lerobot
    python scripts/tiny_checkpoint.py lerobot-smolvla runs/tiny-smolvla    # also writes vlm_config.json

- OpenVLA-OFT: config.json with model_type openvla, merged model.safetensors in timm / HF naming,
  DDP-prefixed action_head-- and proprio_projector-- .pt files, dataset_statistics.json.
- pi0: openpi's examples/convert_jax_model_to_pytorch.py output (config.json, model.safetensors,
  assets/<id>/norm_stats.json), or LeRobot's PI0Policy.save_pretrained (model.-prefixed weights, the
  normalizer processor's statistics); Gemma variant "dummy"'s heads.
- SmolVLA: LeRobot's SmolVLAPolicy.save_pretrained, with a tiny SmolVLM config beside it.

Shapes are tiny; key names, file split and statistics files are the projects'. Weights are random
with a large spread, so that every part changes the actions. A builtin byte tokenizer stands in for
the projects' tokenizers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    GemmaConfig,
    GemmaModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    SmolVLMConfig,
    SmolVLMModel,
)

from vlaopt.model.tokenizer import build_builtin_tokenizer

DINO, SIGLIP = "vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"
VOCAB = 32064  # Llama-2's 32000 + pad, padded to a multiple of 64, as OFT's text_config


def _vit(prefix: str, family: str, width: int, depth: int, mlp: int, patches: int, g: torch.Generator) -> dict:
    def r(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    out = {f"{prefix}patch_embed.proj.weight": r(width, 3, 14, 14, scale=0.05), f"{prefix}patch_embed.proj.bias": r(width),
           f"{prefix}pos_embed": r(1, patches, width), f"{prefix}norm.weight": 1 + r(width), f"{prefix}norm.bias": r(width)}
    if family == "dinov2":
        out[f"{prefix}cls_token"], out[f"{prefix}reg_token"] = r(1, 1, width), r(1, 4, width)
    else:  # SigLIP's attention-pooling head (unused by OFT's patch features)
        out.update({f"{prefix}attn_pool.latent": r(1, 1, width), f"{prefix}attn_pool.q.weight": r(width, width),
                    f"{prefix}attn_pool.kv.weight": r(2 * width, width), f"{prefix}attn_pool.norm.weight": r(width)})
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        out.update({b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
                    b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
                    b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
                    b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
                    b + "mlp.fc1.weight": r(mlp, width), b + "mlp.fc1.bias": r(mlp),
                    b + "mlp.fc2.weight": r(width, mlp), b + "mlp.fc2.bias": r(width)})
        if family == "dinov2":
            out[b + "ls1.scale_factor"], out[b + "ls2.scale_factor"] = r(width), r(width)
    return out


def _linear(name: str, fan_in: int, fan_out: int, g: torch.Generator) -> dict:
    return {f"{name}.weight": torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5,
            f"{name}.bias": torch.randn(fan_out, generator=g) * 0.1}


def _bounds(dim: int, g: torch.Generator, mask: bool) -> dict:
    low = torch.rand(dim, generator=g) - 1.5
    high = low + 0.5 + torch.rand(dim, generator=g)
    out = {"mean": ((low + high) / 2).tolist(), "std": ((high - low) / 4).tolist(), "min": (low - 0.1).tolist(),
           "max": (high + 0.1).tolist(), "q01": low.tolist(), "q99": high.tolist()}
    if mask:
        out["mask"] = [True] * (dim - 1) + [False]  # OFT leaves the gripper unnormalized
    return out


def write_oft(out: str | Path, fused: bool = True, proprio_dim: int = 8, action_dim: int = 7, seed: int = 0,
          image_size: int = 28, datasets: tuple[str, ...] = ("tiny_dataset",)) -> Path:
    """Write the folder; returns it. `fused` DINOv2 + SigLIP (else SigLIP), `proprio_dim` 0 for none."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    patches = (image_size // 14) ** 2
    tensors = {}
    ids = [DINO, SIGLIP] if fused else [SIGLIP]
    backbones = [("dinov2", 48, 3, 96), ("siglip", 32, 3, 80)] if fused else [("siglip", 32, 3, 80)]
    for prefix, (family, width, depth, mlp) in zip(["featurizer.", "fused_featurizer."], backbones):
        tensors.update(_vit(f"vision_backbone.{prefix}", family, width, depth, mlp, patches, g))
    vision_dim = sum(b[1] for b in backbones)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=32000)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(text)
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0, 0.3).add_(1.0 if p.ndim == 1 else 0.0)
    tensors.update({f"language_model.{k}": v.detach().clone() for k, v in lm.state_dict().items()})
    llm = text.hidden_size
    if fused:
        tensors.update({**_linear("projector.fc1", vision_dim, 4 * vision_dim, g),
                        **_linear("projector.fc2", 4 * vision_dim, llm, g), **_linear("projector.fc3", llm, llm, g)})
    else:
        tensors.update({**_linear("projector.fc1", vision_dim, llm, g), **_linear("projector.fc2", llm, llm, g)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})

    hidden = llm
    head = {"model.layer_norm1.weight": 1 + torch.randn(llm * action_dim, generator=g) * 0.3,
            "model.layer_norm1.bias": torch.randn(llm * action_dim, generator=g) * 0.3,
            **_linear("model.fc1", llm * action_dim, hidden, g),
            "model.layer_norm2.weight": 1 + torch.randn(hidden, generator=g) * 0.3,
            "model.layer_norm2.bias": torch.randn(hidden, generator=g) * 0.3, **_linear("model.fc2", hidden, action_dim, g)}
    for i in range(2):
        head[f"model.mlp_resnet_blocks.{i}.ffn.0.weight"] = 1 + torch.randn(hidden, generator=g) * 0.3
        head[f"model.mlp_resnet_blocks.{i}.ffn.0.bias"] = torch.randn(hidden, generator=g) * 0.3
        head.update(_linear(f"model.mlp_resnet_blocks.{i}.ffn.1", hidden, hidden, g))
    torch.save({f"module.{k}": v for k, v in head.items()}, out / "action_head--100_checkpoint.pt")
    if proprio_dim:
        proprio = {**_linear("fc1", proprio_dim, llm, g), **_linear("fc2", llm, llm, g)}
        torch.save({f"module.{k}": v for k, v in proprio.items()}, out / "proprio_projector--100_checkpoint.pt")

    stats = {}
    for name in datasets:
        stats[name] = {"action": _bounds(action_dim, g, mask=True), "num_transitions": 100, "num_trajectories": 4}
        if proprio_dim:
            stats[name]["proprio"] = _bounds(proprio_dim, g, mask=False)
    (out / "dataset_statistics.json").write_text(json.dumps(stats, indent=2))
    text_config = {k: v for k, v in text.to_dict().items() if k != "transformers_version"}
    config = {"model_type": "openvla", "architectures": ["OpenVLAForActionPrediction"],
              "vision_backbone_id": "dinosiglip-vit-so-224px" if fused else "siglip-vit-so400m",
              "llm_backbone_id": "llama2-7b-pure", "arch_specifier": "no-align+fused-gelu-mlp" if fused else
              "no-align+gelu-mlp", "use_fused_vision_backbone": fused, "image_resize_strategy": "resize-naive",
              "timm_model_ids": ids, "timm_override_act_layers": [None] * len(ids), "image_sizes": [image_size] * len(ids),
              "text_config": text_config, "llm_max_length": 2048, "pad_token_id": 32000, "pad_to_multiple_of": 64,
              "n_action_bins": 256, "norm_stats": stats, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    build_builtin_tokenizer().save_pretrained(out)
    return out


PALI, EXPERT = "paligemma_with_expert.paligemma.", "paligemma_with_expert.gemma_expert."
STATE_DIM, ACTION_DIM, PADDED = 5, 4, 32  # the robot's dims, and pi0's max_state_dim / max_action_dim
HORIZON = 6


def _gemma(width: int, mlp: int, seed: int) -> GemmaModel:
    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=600, hidden_size=width, intermediate_size=mlp, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh")
    model = GemmaModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim == 2 else 0.5)
    return model


def _zscore(dim: int, g: torch.Generator) -> dict:
    mean, std = torch.randn(dim, generator=g), 0.2 + torch.rand(dim, generator=g)
    return {"mean": mean.tolist(), "std": std.tolist(), "q01": (mean - 2 * std).tolist(), "q99": (mean + 2 * std).tolist()}


def write_pi0(out: str | Path, lerobot: bool = False, seed: int = 0) -> Path:
    """Write the folder; returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=16, image_size=28, patch_size=14))
    with torch.no_grad():
        for p in vision.parameters():
            p.normal_(0, 0.2).add_(1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0)
    tensors = {f"{PALI}model.vision_tower.vision_model.{k}": v for k, v in vision.state_dict().items()
               if not k.startswith("head.")}  # PaliGemma's SigLIP has no pooling head
    vlm, expert = _gemma(64, 128, seed + 1), _gemma(32, 96, seed + 2)
    tensors.update({f"{PALI}model.language_model.{k}": v for k, v in vlm.state_dict().items()})
    tensors[f"{PALI}model.multi_modal_projector.linear.weight"] = torch.randn(64, 32, generator=g) * 0.2
    tensors[f"{PALI}model.multi_modal_projector.linear.bias"] = torch.randn(64, generator=g) * 0.2
    tensors[f"{PALI}lm_head.weight"] = vlm.embed_tokens.weight.detach().clone()  # tied to the embedding
    tensors.update({f"{EXPERT}model.{k}": v for k, v in expert.state_dict().items() if not k.startswith("embed_tokens")})
    tensors[f"{EXPERT}lm_head.weight"] = torch.randn(600, 32, generator=g)  # unused: the expert emits no tokens
    for name, (fan_in, fan_out) in {"state_proj": (PADDED, 32), "action_in_proj": (PADDED, 32),
                                    "action_time_mlp_in": (64, 32), "action_time_mlp_out": (32, 32),
                                    "action_out_proj": (32, PADDED)}.items():
        tensors[f"{name}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
        tensors[f"{name}.bias"] = torch.randn(fan_out, generator=g) * 0.1
    prefix = "model." if lerobot else ""
    save_file({prefix + k: v.detach().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    state, action = _zscore(STATE_DIM, g), _zscore(ACTION_DIM, g)
    if lerobot:
        features = {"observation.images.base": {"type": "VISUAL", "shape": [3, 28, 28]},
                    "observation.images.wrist": {"type": "VISUAL", "shape": [3, 28, 28]},
                    "observation.state": {"type": "STATE", "shape": [STATE_DIM]}}
        config = {"type": "pi0", "n_obs_steps": 1, "input_features": features,
                  "output_features": {"action": {"type": "ACTION", "shape": [ACTION_DIM]}},
                  "paligemma_variant": "dummy", "action_expert_variant": "dummy", "chunk_size": HORIZON,
                  "n_action_steps": HORIZON, "max_state_dim": PADDED, "max_action_dim": PADDED,
                  "num_inference_steps": 10, "min_period": 4e-3, "max_period": 4.0, "image_resolution": [28, 28],
                  "empty_cameras": 0, "tokenizer_max_length": 48,
                  "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}}
        _lerobot_stats(out, state, action)
    else:
        config = {"action_dim": PADDED, "action_horizon": HORIZON, "paligemma_variant": "dummy",
                  "action_expert_variant": "dummy", "precision": "float32"}
        (out / "assets" / "tiny_robot").mkdir(parents=True, exist_ok=True)
        (out / "assets" / "tiny_robot" / "norm_stats.json").write_text(
            json.dumps({"norm_stats": {"state": state, "actions": action}}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    build_builtin_tokenizer().save_pretrained(out)
    return out



def _lerobot_stats(out: Path, state: dict, action: dict) -> None:
    """LeRobot's normalizer / unnormalizer processor files and the pipeline description."""
    stats = {f"{feature}.{k}": torch.tensor(v[k]) for feature, v in (("observation.state", state),
                                                                    ("action", action)) for k in ("mean", "std")}
    save_file(stats, str(out / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    save_file(stats, str(out / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    (out / "policy_preprocessor.json").write_text(json.dumps({"name": "policy_preprocessor", "steps": []}))


SMOL_VLM, SMOL_EXPERT, SMOL_HORIZON = "vlm_with_expert.vlm.", "vlm_with_expert.lm_expert.", 5


def smolvlm_config() -> SmolVLMConfig:
    """A tiny SmolVLM: 56 px images in 14 px patches (a 4 x 4 grid), pixel shuffle 2, a 2-layer Llama."""
    return SmolVLMConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 56, "patch_size": 14},
        text_config={"model_type": "llama", "vocab_size": 600, "hidden_size": 48, "intermediate_size": 96,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
                     "rope_theta": 100000.0, "rms_norm_eps": 1e-5},
        scale_factor=2)


def write_smolvla(out: str | Path, seed: int = 0) -> Path:
    """Write a LeRobot SmolVLA folder (and vlm_config.json, the tiny VLM's config); returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = smolvlm_config()
    vlm = SmolVLMModel(cfg)
    text = cfg.text_config
    expert = LlamaModel(LlamaConfig(vocab_size=600, hidden_size=36, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=12))
    kv = text.num_key_value_heads * text.head_dim
    expert.layers[1].self_attn.k_proj = torch.nn.Linear(kv, kv, bias=False)  # SmolVLA's cross-attention layer
    expert.layers[1].self_attn.v_proj = torch.nn.Linear(kv, kv, bias=False)
    with torch.no_grad():
        for model in (vlm, expert):
            for p in model.parameters():
                p.normal_(0, 0.3).add_(1.0 if p.ndim == 1 else 0.0)
    tensors = {f"{SMOL_VLM}model.{k}": v for k, v in vlm.state_dict().items()}
    tensors[f"{SMOL_VLM}lm_head.weight"] = torch.randn(600, 48, generator=g) * 0.3
    tensors.update({f"{SMOL_EXPERT}{k}": v for k, v in expert.state_dict().items() if not k.startswith("embed_tokens")})
    for name, (fan_in, fan_out) in {"state_proj": (PADDED, 48), "action_in_proj": (PADDED, 36),
                                    "action_time_mlp_in": (72, 36), "action_time_mlp_out": (36, 36),
                                    "action_out_proj": (36, PADDED)}.items():
        tensors[f"{name}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
        tensors[f"{name}.bias"] = torch.randn(fan_out, generator=g) * 0.1
    save_file({f"model.{k}": v.detach().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    features = {"observation.images.top": {"type": "VISUAL", "shape": [3, 56, 56]},
                "observation.images.wrist": {"type": "VISUAL", "shape": [3, 56, 56]},
                "observation.state": {"type": "STATE", "shape": [STATE_DIM]}}
    config = {"type": "smolvla", "n_obs_steps": 1, "input_features": features,
              "output_features": {"action": {"type": "ACTION", "shape": [ACTION_DIM]}}, "chunk_size": SMOL_HORIZON,
              "n_action_steps": SMOL_HORIZON, "max_state_dim": PADDED, "max_action_dim": PADDED, "num_steps": 10,
              "vlm_model_name": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct", "add_image_special_tokens": False,
              "attention_mode": "cross_attn", "num_expert_layers": -1, "num_vlm_layers": 2,
              "self_attn_every_n_layers": 2, "expert_width_multiplier": 0.75, "resize_imgs_with_padding": [56, 56],
              "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _lerobot_stats(out, _zscore(STATE_DIM, g), _zscore(ACTION_DIM, g))
    (out / "vlm_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    build_builtin_tokenizer().save_pretrained(out)
    return out


WRITERS = {"oft": write_oft, "openpi-pytorch": write_pi0, "lerobot-pi0": lambda out, seed=0: write_pi0(out, True, seed),
           "lerobot-smolvla": write_smolvla}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=sorted(WRITERS), help="the layout to write")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--single", action="store_true", help="oft: SigLIP only (default: DINOv2 + SigLIP fused)")
    parser.add_argument("--no-proprio", action="store_true", help="oft: no proprio projector")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.format == "oft":
        print(write_oft(args.out, fused=not args.single, proprio_dim=0 if args.no_proprio else 8, seed=args.seed))
    else:
        print(WRITERS[args.format](args.out, seed=args.seed))


if __name__ == "__main__":
    main()
