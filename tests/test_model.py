"""The reference VLA: every LM family and head, batching, determinism, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import observations

from vlaopt import VLA, LMConfig, VLAConfig, load

FAMILIES = ["llama", "qwen2", "qwen3", "gemma"]
HEADS = ["l1", "discrete", "diffusion", "flow"]


def _noise(cfg: VLAConfig, batch: int) -> torch.Tensor:
    return torch.randn((batch, cfg.chunk, cfg.action_dim), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("lm", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_batch_equals_each_sample_alone(lm, head):
    cfg = VLAConfig.tiny(lm=lm, head=head, cameras=2, proprio_dim=3)
    model = VLA(cfg).eval()
    images, instructions, proprio = observations(cfg)
    assert len({len(t) for t in instructions}) == 3  # prompts of different lengths share a batch
    noise = _noise(cfg, 3)
    batch = model.predict_action(images, instructions, proprio, noise=noise)
    assert batch.shape == (3, cfg.chunk, cfg.action_dim)
    assert torch.isfinite(batch).all()
    # DDIM's first step divides by sqrt(alpha_bar) of the noisiest step (~0.08), amplifying fp32
    # rounding of differently shaped matmuls; every other head agrees to 1e-5.
    tol = 1e-4 if head == "diffusion" else 1e-5
    for i in range(3):
        alone = model.predict_action(images[i : i + 1], instructions[i : i + 1], proprio[i : i + 1], noise=noise[i : i + 1])
        torch.testing.assert_close(alone, batch[i : i + 1], atol=tol, rtol=0)


@pytest.mark.parametrize("vision", ["siglip", "dinov2", "fused"])
def test_vision_kinds_give_one_token_per_patch_and_camera(vision):
    cfg = VLAConfig.tiny(vision=vision, cameras=2)
    model = VLA(cfg).eval()
    images, _, _ = observations(cfg, batch=2)
    feats = model.vision(torch.from_numpy(images))
    assert feats.shape == (2, 2 * cfg.vision.patches_per_image, cfg.vision.feature_dim)
    # fused uses the 3-layer projector of Prismatic, single backbones the 2-layer one
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == (3 if vision == "fused" else 2)


def test_cameras_are_encoded_independently(tiny_model):
    cfg = tiny_model.config
    images, _, _ = observations(cfg, batch=1)
    feats = tiny_model.vision(torch.from_numpy(images))
    swapped = tiny_model.vision(torch.from_numpy(images[:, ::-1].copy()))
    n = cfg.vision.patches_per_image
    torch.testing.assert_close(feats[:, :n], swapped[:, n:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", HEADS)
def test_save_then_load_gives_bit_identical_actions(tmp_path, head):
    cfg = VLAConfig.tiny(lm="qwen2", head=head, proprio_dim=2)
    model = VLA(cfg).eval()
    model.set_stats({"action": {"q01": [-2.0] * 7, "q99": [3.0] * 7}, "proprio": {"q01": [0, 0], "q99": [1, 1]}})
    images, instructions, proprio = observations(cfg)
    before = model.predict_action(images, instructions, proprio, seed=5)
    model.save_pretrained(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert torch.equal(loaded.predict_action(images, instructions, proprio, seed=5), before)
    assert loaded.stats() == model.stats()
    assert loaded.config.to_dict() == model.config.to_dict()


def test_save_over_an_existing_model_replaces_its_files_and_keeps_the_users(tmp_path, tiny_model):
    target = tmp_path / "m"
    VLA(VLAConfig.tiny(proprio_dim=4, cameras=2, seed=7)).save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    tiny_model.save_pretrained(target)
    images, instructions, proprio = observations(tiny_model.config)
    loaded = load(target)
    assert torch.equal(loaded.predict_action(images, instructions, proprio),
                       tiny_model.predict_action(images, instructions, proprio))
    assert (target / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind
    assert not [p.name for p in target.iterdir() if p.name.startswith(".")]


def test_same_seed_same_model_other_seed_other_model():
    images, instructions, _ = observations(VLAConfig.tiny())
    a = VLA(VLAConfig.tiny(seed=3)).eval().predict_action(images, instructions)
    b = VLA(VLAConfig.tiny(seed=3)).eval().predict_action(images, instructions)
    c = VLA(VLAConfig.tiny(seed=4)).eval().predict_action(images, instructions)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("head", ["diffusion", "flow"])
def test_stochastic_heads_are_seeded(head):
    cfg = VLAConfig.tiny(head=head)
    model = VLA(cfg).eval()
    images, instructions, _ = observations(cfg)
    assert torch.equal(model.predict_action(images, instructions, seed=1), model.predict_action(images, instructions, seed=1))
    assert not torch.equal(model.predict_action(images, instructions, seed=1), model.predict_action(images, instructions, seed=2))


def test_actions_are_unnormalized_with_q01_q99(tiny_model):
    cfg = tiny_model.config
    images, instructions, proprio = observations(cfg)
    tiny_model.set_stats({"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}, "proprio": {"q01": [-1.0] * 4, "q99": [1.0] * 4}})
    unit = tiny_model.predict_action(images, instructions, proprio)
    lo, hi = torch.arange(7.0), torch.arange(7.0) * 3 + 1
    tiny_model.set_stats({"action": {"q01": lo.tolist(), "q99": hi.tolist()}, "proprio": {"q01": [-1.0] * 4, "q99": [1.0] * 4}})
    scaled = tiny_model.predict_action(images, instructions, proprio)
    torch.testing.assert_close(scaled, (unit.clamp(-1, 1) + 1) / 2 * (hi - lo) + lo, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", HEADS)
def test_training_loss_falls_on_a_fixed_batch(head):
    cfg = VLAConfig.tiny(head=head, proprio_dim=2)
    model = VLA(cfg).train()
    images, instructions, proprio = observations(cfg, batch=4)
    actions = torch.rand((4, cfg.chunk, cfg.action_dim), generator=torch.Generator().manual_seed(0)) * 2 - 1
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def loss_at(step: int) -> torch.Tensor:
        return model.compute_loss(images, instructions, actions, proprio, generator=torch.Generator().manual_seed(step))

    held_out = range(100, 108)  # fixed noise / timesteps to evaluate on
    with torch.no_grad():
        start = sum(loss_at(s).item() for s in held_out)
    for step in range(40):
        opt.zero_grad()
        loss_at(step).backward()
        opt.step()
    with torch.no_grad():
        end = sum(loss_at(s).item() for s in held_out)
    assert end < 0.9 * start


def test_bidirectional_action_slots_change_actions():
    cfg = VLAConfig.tiny()
    images, instructions, _ = observations(cfg)
    bi = VLA(cfg).eval().predict_action(images, instructions)
    cfg.bidirectional_actions = False
    causal = VLA(cfg).eval().predict_action(images, instructions)
    assert not torch.allclose(bi, causal)


def test_lm_from_local_hf_directory_uses_its_weights_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    hf = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "llama", vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=64,
        )
    )
    hf.save_pretrained(tmp_path / "lm")
    words = ["[UNK]", "<s>", "</s>", "in", ":", "what", "action"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="[UNK]").save_pretrained(
        tmp_path / "lm"
    )
    cfg = VLAConfig.tiny()
    cfg.lm = LMConfig(pretrained=str(tmp_path / "lm"))
    model = VLA(cfg).eval()
    assert len(model.tokenizer) == len(words)
    assert torch.equal(model.lm.causal_lm.model.layers[1].mlp.up_proj.weight, hf.model.layers[1].mlp.up_proj.weight)
    images, instructions, _ = observations(cfg)
    model.save_pretrained(tmp_path / "vla")
    (tmp_path / "lm" / "model.safetensors").unlink()  # the saved VLA must not need the LM folder
    loaded = load(tmp_path / "vla")
    assert len(loaded.tokenizer) == len(words)
    assert torch.equal(loaded.predict_action(images, instructions), model.predict_action(images, instructions))


def test_numpy_and_torch_images_agree(tiny_model):
    images, instructions, proprio = observations(tiny_model.config)
    a = tiny_model.predict_action(images, instructions, proprio)
    b = tiny_model.predict_action(torch.from_numpy(images), instructions, proprio.numpy())
    assert torch.equal(a, b)
    assert np.isfinite(a.numpy()).all()


@pytest.mark.parametrize("head", ["l1", "discrete", "diffusion", "flow", "expert"])
def test_bfloat16_model_runs_and_saves_in_bfloat16(tmp_path, head):
    """A model cast to bf16 predicts (actions come back in float32, unnormalized with float32 bounds)
    and saves and loads back in bf16 with identical actions."""
    cfg = VLAConfig.tiny(head=head, cameras=2, proprio_dim=3)
    model = VLA(cfg).eval()
    model.set_stats({"action": {"q01": [-1.001] * 7, "q99": [1.001] * 7}, "proprio": {"q01": [-2.0] * 3, "q99": [2.0] * 3}})
    images, instructions, proprio = observations(cfg, batch=2)
    reference = model.predict_action(images, instructions, proprio)
    half = model.to(torch.bfloat16)
    assert half.action_norm.q99.dtype == torch.float32 and half.stats()["action"]["q99"][0] == pytest.approx(1.001)
    actions = half.predict_action(images, instructions, proprio)
    assert actions.dtype == torch.float32 and torch.isfinite(actions).all()
    if head in ("l1", "flow", "expert"):  # bf16 keeps ~3 significant digits; discrete bins and DDIM amplify ties
        assert (actions - reference).abs().max() < 0.05
    loaded = load(half.save_pretrained(tmp_path / "bf16"))
    assert loaded.config.dtype == "bfloat16" and loaded.lm.causal_lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.equal(loaded.predict_action(images, instructions, proprio), actions)
