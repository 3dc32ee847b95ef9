"""Write a tiny random OpenVLA-OFT checkpoint folder in the exact layout the authors' training saves
(config.json with model_type openvla, merged model.safetensors in timm / HF naming, DDP-prefixed
action_head-- and proprio_projector-- .pt files, dataset_statistics.json, a tokenizer), for tests
and for trying `vla-opt import` without a 7B download:

    python scripts/tiny_oft_checkpoint.py runs/tiny-oft [--single] [--no-proprio]

Shapes are tiny; the layout, key names, file split and statistics format are OFT's. Weights are
random with a large spread, so that every part changes the actions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

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


def _stats(dim: int, g: torch.Generator, mask: bool) -> dict:
    low = torch.rand(dim, generator=g) - 1.5
    high = low + 0.5 + torch.rand(dim, generator=g)
    out = {"mean": ((low + high) / 2).tolist(), "std": ((high - low) / 4).tolist(), "min": (low - 0.1).tolist(),
           "max": (high + 0.1).tolist(), "q01": low.tolist(), "q99": high.tolist()}
    if mask:
        out["mask"] = [True] * (dim - 1) + [False]  # OFT leaves the gripper unnormalized
    return out


def write(out: str | Path, fused: bool = True, proprio_dim: int = 8, action_dim: int = 7, seed: int = 0,
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
        stats[name] = {"action": _stats(action_dim, g, mask=True), "num_transitions": 100, "num_trajectories": 4}
        if proprio_dim:
            stats[name]["proprio"] = _stats(proprio_dim, g, mask=False)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--single", action="store_true", help="SigLIP only (default: DINOv2 + SigLIP fused)")
    parser.add_argument("--no-proprio", action="store_true", help="no proprio projector")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.out, fused=not args.single, proprio_dim=0 if args.no_proprio else 8, seed=args.seed))


if __name__ == "__main__":
    main()
