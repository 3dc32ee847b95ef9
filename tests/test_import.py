"""`vla-opt import`: tiny checkpoints in OpenVLA-OFT's exact layout (scripts/tiny_checkpoint.py)
against a reference forward typed here from OFT's equations (timm ViT blocks, Prismatic projector,
the Llama run by transformers itself with OFT's bidirectional mask, MLPResNet, OFT's unnormalization)."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import vlaopt
from vlaopt.cli import main
from vlaopt.importers import UnsupportedCheckpoint, import_checkpoint
from vlaopt.model.processor import prompt_text

_spec = importlib.util.spec_from_file_location("tiny", Path(__file__).parents[1] / "scripts" / "tiny_checkpoint.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

IMAGE_MEAN = {"dinov2": (0.485, 0.456, 0.406), "siglip": (0.5, 0.5, 0.5)}
IMAGE_STD = {"dinov2": (0.229, 0.224, 0.225), "siglip": (0.5, 0.5, 0.5)}
HEADS = 16  # both timm ids OFT uses have 16 heads
CHUNK = 8  # OFT's LIBERO constant


# ---- the reference: OFT's forward, typed from its equations ------------------------------------------
def ref_vit(sd: dict, p: str, pixels: torch.Tensor, dinov2: bool) -> torch.Tensor:
    """timm ViT, as OFT's featurizer: output of the second-to-last block, prefix tokens dropped."""
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2) + sd[p + "pos_embed"]  # no_embed_class for the register DINOv2
    b, _, d = x.shape
    if dinov2:
        x = torch.cat([sd[p + "cls_token"].expand(b, -1, -1), sd[p + "reg_token"].expand(b, -1, -1), x], 1)
    depth = len({k.split(".")[3] for k in sd if k.startswith(p + "blocks.")})
    for i in range(depth - 1):  # get_intermediate_layers(n={depth - 2})
        q = f"{p}blocks.{i}."
        h = F.layer_norm(x, (d,), sd[q + "norm1.weight"], sd[q + "norm1.bias"], eps=1e-6)
        qkv = (h @ sd[q + "attn.qkv.weight"].T + sd[q + "attn.qkv.bias"]).reshape(b, -1, 3, HEADS, d // HEADS)
        qq, kk, vv = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(qq @ kk.transpose(-1, -2) / math.sqrt(d // HEADS), -1) @ vv
        att = att.transpose(1, 2).reshape(b, -1, d) @ sd[q + "attn.proj.weight"].T + sd[q + "attn.proj.bias"]
        x = x + (att * sd[q + "ls1.scale_factor"] if dinov2 else att)
        h = F.layer_norm(x, (d,), sd[q + "norm2.weight"], sd[q + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[q + "mlp.fc1.weight"].T + sd[q + "mlp.fc1.bias"]) @ sd[q + "mlp.fc2.weight"].T
        h = h + sd[q + "mlp.fc2.bias"]
        x = x + (h * sd[q + "ls2.scale_factor"] if dinov2 else h)
    return x[:, 5:] if dinov2 else x


def lin(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def ref_actions(src: Path, images: np.ndarray, instruction: str, proprio: np.ndarray | None,
                key: str = "tiny_dataset", prune: bool = False) -> torch.Tensor:
    """OFT's predict_action on one observation (batch 1), images (cams, H, W, 3) uint8."""
    cfg = json.loads((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    head = {k.removeprefix("module."): v for k, v in torch.load(next(src.glob("action_head--*")), weights_only=True).items()}
    stats = json.loads((src / "dataset_statistics.json").read_text())[key]
    fused = cfg["use_fused_vision_backbone"]
    patches = []
    for img in torch.from_numpy(images):  # each image: [DINOv2 | SigLIP] channels, then the next image
        pix = img.permute(2, 0, 1)[None].float() / 255

        def norm(f: str, pix: torch.Tensor = pix) -> torch.Tensor:
            return (pix - torch.tensor(IMAGE_MEAN[f])[:, None, None]) / torch.tensor(IMAGE_STD[f])[:, None, None]

        if fused:
            patches.append(torch.cat([ref_vit(sd, "vision_backbone.featurizer.", norm("dinov2"), True),
                                      ref_vit(sd, "vision_backbone.fused_featurizer.", norm("siglip"), False)], 2))
        else:
            patches.append(ref_vit(sd, "vision_backbone.featurizer.", norm("siglip"), False))
    x = torch.cat(patches, 1)
    x = lin(sd, "projector.fc1", x)
    x = lin(sd, "projector.fc2", F.gelu(x))
    x = lin(sd, "projector.fc3", F.gelu(x)) if fused else x
    text = LlamaConfig(**{k: v for k, v in cfg["text_config"].items() if k != "model_type"})
    lm = LlamaForCausalLM(text).eval()
    lm.load_state_dict({k.removeprefix("language_model."): v for k, v in sd.items() if k.startswith("language_model.")})
    embed = lm.get_input_embeddings()
    tokenizer = tiny.build_builtin_tokenizer()
    ids = [1] + tokenizer(prompt_text(instruction), add_special_tokens=False)["input_ids"] + [29871]
    prompt = embed(torch.tensor([ids]))
    parts = [prompt[:, :1], x]
    if proprio is not None:
        low, high = np.array(stats["proprio"]["q01"]), np.array(stats["proprio"]["q99"])
        p = np.clip(2 * (proprio - low) / (high - low + 1e-8) - 1, -1, 1)
        pp = {k.removeprefix("module."): v for k, v in torch.load(next(src.glob("proprio_projector--*")),
                                                                  weights_only=True).items()}
        parts.append(lin(pp, "fc2", F.gelu(lin(pp, "fc1", torch.tensor(p, dtype=torch.float32)[None])))[:, None])
    action_dim = head["model.fc2.weight"].shape[0]
    parts += [prompt[:, 1:], torch.zeros(1, CHUNK * action_dim, text.hidden_size), embed(torch.tensor([[2]]))]
    seq = torch.cat(parts, 1)
    start = seq.shape[1] - CHUNK * action_dim - 1
    if prune:  # LightVLA's TokenPruner before the first layer: keep the patches some patch votes for
        n = x.shape[1]

        def rms(t: torch.Tensor) -> torch.Tensor:
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)

        pat, task = rms(seq[:, 1:1 + n]), rms(seq[:, 1 + n:])
        score = rms(F.scaled_dot_product_attention(pat, task, task)) @ pat.transpose(-1, -2) / math.sqrt(seq.shape[-1])
        keep = torch.zeros(n, dtype=torch.bool)
        keep[score[0].argmax(-1)] = True
        positions = torch.cat([torch.tensor([0]), torch.arange(1, n + 1)[keep], torch.arange(n + 1, seq.shape[1])])
        seq = torch.cat([seq[:, :1], seq[:, 1:1 + n][:, keep], seq[:, 1 + n:]], 1)
        start -= n - int(keep.sum())
    else:
        positions = torch.arange(seq.shape[1])
    full = torch.ones(1, 1, seq.shape[1], seq.shape[1], dtype=torch.bool)  # OFT's fork: full bidirectional attention
    with torch.no_grad():
        out = lm.model(inputs_embeds=seq, attention_mask=full, position_ids=positions[None]).last_hidden_state
        h = out[:, start:start + CHUNK * action_dim].reshape(1, CHUNK, -1)
        h = F.relu(lin(head, "model.fc1", F.layer_norm(h, h.shape[-1:], head["model.layer_norm1.weight"],
                                                       head["model.layer_norm1.bias"])))
        for i in range(2):
            b = f"model.mlp_resnet_blocks.{i}.ffn."
            h = h + F.relu(lin(head, b + "1", F.layer_norm(h, h.shape[-1:], head[b + "0.weight"], head[b + "0.bias"])))
        a = lin(head, "model.fc2", F.layer_norm(h, h.shape[-1:], head["model.layer_norm2.weight"],
                                                head["model.layer_norm2.bias"]))[0].numpy()
    s = stats["action"]
    low, high, mask = np.array(s["q01"]), np.array(s["q99"]), np.array(s["mask"])
    return torch.tensor(np.where(mask, 0.5 * (a + 1) * (high - low + 1e-8) + low, a), dtype=torch.float32)


def observation(cams: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (cams, 28, 28, 3), dtype=np.uint8), rng.normal(0, 1, 8).astype(np.float32)


# ---- equivalence -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused,proprio,cams", [(True, True, 2), (False, False, 1)])
def test_oft_import_matches_the_reference_forward(tmp_path, fused, proprio, cams):
    src = tiny.write_oft(tmp_path / "oft", fused=fused, proprio_dim=8 if proprio else 0)
    model = import_checkpoint("oft", src, cameras=cams)
    assert model.config.vision.layout == "timm" and model.config.vision.features == "penultimate"
    for seed, instruction in enumerate(["open the drawer", "Push the Button"]):
        images, state = observation(cams, seed)
        ref = ref_actions(src, images, instruction, state if proprio else None)
        ours = model.predict_action(images[None], [instruction], state[None] if proprio else None)[0]
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ref.abs().max() > 1.0  # unclipped: the random head leaves [-1, 1], as OFT would show it


def test_lightvla_import_adds_its_pruner_and_matches_the_reference(tmp_path):
    src = tiny.write_oft(tmp_path / "oft", fused=True)
    model = import_checkpoint("lightvla", src, cameras=2)
    assert [next(iter(e)) for e in model.config.recipe] == ["token_pruning"]
    images, state = observation(2, 3)
    ref = ref_actions(src, images, "open the drawer", state, prune=True)
    torch.testing.assert_close(model.predict_action(images[None], ["open the drawer"], state[None])[0], ref,
                               atol=2e-4, rtol=1e-4)
    assert not torch.allclose(ref, ref_actions(src, images, "open the drawer", state), atol=1e-3)


def test_cli_import_saves_a_model_that_loads_and_takes_recipes(tmp_path, capsys):
    src = tiny.write_oft(tmp_path / "oft", fused=True)
    out = tmp_path / "vla"
    assert main(["import", "--format", "oft", str(src), "--out", str(out), "--cameras", "2"]) == 0
    assert "chunk 8 x 7, proprio 8, 2 camera(s)" in " ".join(capsys.readouterr().out.split())
    model = vlaopt.load(out)
    images, state = observation(2)
    torch.testing.assert_close(model.predict_action(images[None], ["open the drawer"], state[None])[0],
                               ref_actions(src, images, "open the drawer", state), atol=2e-4, rtol=1e-4)
    pruned = vlaopt.apply(vlaopt.load(out), [{"token_pruning": {"method": "fastv", "layer": 1, "keep": 0.5}},
                                             {"quantize": {"method": "int8"}}])
    assert pruned.predict_action(images[None], ["open the drawer"], state[None]).shape == (1, 8, 7)


# ---- options and refusals ----------------------------------------------------------------------------
def test_platform_sets_the_chunk_and_bounds(tmp_path):
    src = tiny.write_oft(tmp_path / "oft", fused=False, proprio_dim=0)
    model = import_checkpoint("oft", src, platform="aloha")
    stats = json.loads((src / "dataset_statistics.json").read_text())["tiny_dataset"]["action"]
    assert model.config.chunk == 25
    assert model.stats()["action"]["q01"] == pytest.approx(stats["min"])
    assert model.stats()["action"]["mask"] == stats["mask"]


def _refusal(src: Path, **options) -> str:
    with pytest.raises(UnsupportedCheckpoint) as info:
        import_checkpoint("oft", src, **options)
    return str(info.value)


def test_refusals_name_what_cannot_be_represented(tmp_path):
    src = tiny.write_oft(tmp_path / "oft", fused=False, proprio_dim=0, datasets=("a", "b"))
    assert _refusal(src) == "the checkpoint has statistics of 2 datasets (a, b); choose one with unnorm_key"
    assert _refusal(src, unnorm_key="c") == "unnorm_key='c' is not among the statistics (a, b)"
    (src / "noisy_action_projector--100_checkpoint.pt").write_bytes(b"")
    assert _refusal(src, unnorm_key="a") == ("noisy_action_projector--100_checkpoint.pt: diffusion action heads are "
                                             "not supported")
    (src / "noisy_action_projector--100_checkpoint.pt").unlink()
    weights = load_file(str(src / "model.safetensors"))
    weights["vision_backbone.featurizer.blocks.0.film.gamma"] = torch.zeros(3)
    save_file(weights, str(src / "model.safetensors"))
    assert _refusal(src, unnorm_key="a") == ("vla-opt does not model tensor vision_backbone.featurizer.blocks.0.film.gamma "
                                             f"of {src}/model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["timm_model_ids"] = ["vit_large_patch14_clip_224.openai"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert _refusal(src, unnorm_key="a").startswith("vision backbone vit_large_patch14_clip_224.openai "
                                                    "(vision_backbone_id 'siglip-vit-so400m') is not supported")


def test_pt_files_are_read_without_running_pickled_code(tmp_path):
    src = tiny.write_oft(tmp_path / "oft", fused=False, proprio_dim=0)
    head = next(src.glob("action_head--*"))
    head.write_bytes(pickle.dumps(print))  # a pickle that names a callable: weights_only refuses it
    message = _refusal(src)
    assert message.startswith(f"{head} cannot be read as a weights-only state dict")


# ---- the new config options, each alone --------------------------------------------------------------
def test_full_attention_lets_early_tokens_see_later_ones():
    from vlaopt.model.vla import VLA

    images = np.random.default_rng(0).integers(0, 256, (1, 1, 32, 32, 3), dtype=np.uint8)
    for full in (False, True):
        model = VLA(_tiny(full_attention=full)).eval()
        a, b = (model.lm(model.lm_input(images, [t])).hidden[:, 1] for t in ("open the door", "open the drawer"))
        assert torch.allclose(a, b) != full  # the first visual token sees the prompt only with full attention


def _tiny(**fields):
    from dataclasses import replace

    from vlaopt.config import VLAConfig

    return replace(VLAConfig.tiny(), **fields)


def test_unclipped_actions_and_prompt_suffix():
    from vlaopt.model.vla import VLA

    model = VLA(_tiny(prompt_suffix_ids=[7, 9])).eval()
    ids = model.processor.tokens("open it")
    assert ids[-2:] == [7, 9] and model.processor.tokens("open it") == ids
    raw = torch.tensor([[[3.0] * model.config.action_dim] * model.config.chunk])
    assert model.unnormalize(raw).max() == 1.0
    model.config.clip_actions = False
    assert model.unnormalize(raw).max() == 3.0


def test_penultimate_features_are_the_second_to_last_block_without_the_final_norm():
    from vlaopt.config import VisionConfig
    from vlaopt.model.vision import VisionEncoder

    images = torch.randint(0, 256, (2, 1, 32, 32, 3), dtype=torch.uint8)
    for layout in ("hf", "timm"):
        base = {"kind": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_heads": 2,
                "intermediate_size": 64, "layout": layout}
        torch.manual_seed(0)
        deep = VisionEncoder(VisionConfig(num_layers=3, features="penultimate", **base)).eval()
        torch.manual_seed(0)
        shallow = VisionEncoder(VisionConfig(num_layers=2, **base)).eval()
        shallow.load_state_dict(deep.state_dict(), strict=False)
        norm = shallow.backbones["siglip"]
        norm = norm.post_layernorm if layout == "hf" else norm.norm
        torch.nn.init.ones_(norm.weight), torch.nn.init.zeros_(norm.bias)
        with torch.no_grad():
            got, want = deep(images), shallow(images)
        # the shallow copy ends with a (unit) LayerNorm: normalize the deep features the same way to compare
        torch.testing.assert_close(F.layer_norm(got, got.shape[-1:], eps=norm.eps), want, atol=1e-5, rtol=1e-5)
