"""Bad input gets one clear error naming the value and what was expected."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import observations
from safetensors.torch import load_file, save_file

from vlaopt import VLA, VLAConfig, load
from vlaopt.model.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def model():
    return VLA(VLAConfig.tiny(proprio_dim=4, cameras=2)).eval()


@pytest.fixture
def obs(model):
    return observations(model.config, batch=2)


def test_wrong_image_size(model, obs):
    images, instructions, proprio = obs
    with pytest.raises(ValueError, match=r"images are 16x16, expected 32x32 in shape \(B, 2, 32, 32, 3\)"):
        model.predict_action(images[:, :, :16, :16], instructions, proprio)


def test_wrong_channel_count(model, obs):
    images, instructions, proprio = obs
    with pytest.raises(ValueError, match=r"images have 4 channels, expected 3"):
        model.predict_action(np.concatenate([images, images[..., :1]], -1), instructions, proprio)


def test_wrong_camera_count(model, obs):
    images, instructions, proprio = obs
    with pytest.raises(ValueError, match=r"images have 1 cameras, expected 2"):
        model.predict_action(images[:, :1], instructions, proprio)


def test_wrong_image_dtype(model, obs):
    images, instructions, proprio = obs
    with pytest.raises(ValueError, match=r"images have dtype torch.float32, expected uint8"):
        model.predict_action(images.astype(np.float32), instructions, proprio)


def test_wrong_image_rank(model, obs):
    images, instructions, proprio = obs
    with pytest.raises(ValueError, match=r"images have shape \(2, 32, 32, 3\), expected \(B, 2, 32, 32, 3\)"):
        model.predict_action(images[:, 0], instructions, proprio)


def test_wrong_proprio_size(model, obs):
    images, instructions, proprio = obs
    with pytest.raises(ValueError, match=r"proprio has shape \(2, 3\), expected \(2, 4\)"):
        model.predict_action(images, instructions, proprio[:, :3])


def test_missing_proprio(model, obs):
    images, instructions, _ = obs
    with pytest.raises(ValueError, match=r"this model needs proprio of shape \(2, 4\)"):
        model.predict_action(images, instructions)


def test_nan_proprio(model, obs):
    images, instructions, proprio = obs
    proprio = proprio.clone()
    proprio[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"proprio contains a non-finite value at index \[1, 2\]: nan"):
        model.predict_action(images, instructions, proprio)


def test_nan_actions_in_loss(model, obs):
    images, instructions, proprio = obs
    actions = torch.zeros(2, model.config.chunk, model.config.action_dim)
    actions[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="actions contain NaN or infinite values"):
        model.compute_loss(images, instructions, actions, proprio)


def test_empty_instruction(model, obs):
    images, _, proprio = obs
    with pytest.raises(ValueError, match=r"instruction 1 is '  ', expected a non-empty string"):
        model.predict_action(images, ["open the drawer", "  "], proprio)


def test_batch_sizes_disagree(model, obs):
    images, instructions, proprio = obs
    with pytest.raises(ValueError, match="got 1 instructions for a batch of 2 images"):
        model.predict_action(images, instructions[:1], proprio)
    with pytest.raises(ValueError, match=r"proprio has shape \(3, 4\), expected \(2, 4\)"):
        model.predict_action(images, instructions, torch.zeros(3, 4))


@pytest.fixture
def saved(tmp_path, model):
    return model.save_pretrained(tmp_path / "m")


def test_checkpoint_missing_weight(saved):
    state = load_file(str(saved / "model.safetensors"))
    del state["head.net.out.1.weight"]
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks key 'head.net.out.1.weight'"):
        load(saved)


def test_checkpoint_misshaped_weight(saved):
    state = load_file(str(saved / "model.safetensors"))
    state["projector.0.weight"] = state["projector.0.weight"][:, :5].contiguous()
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"weight 'projector.0.weight' .* has shape \(64, 5\), expected \(64, 32\)"):
        load(saved)


def test_checkpoint_weight_of_another_dtype(saved):
    state = load_file(str(saved / "model.safetensors"))
    state["projector.0.weight"] = state["projector.0.weight"].half()
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"weight 'projector.0.weight' .* has dtype torch.float16, expected torch.float32"):
        load(saved)


def test_checkpoint_unexpected_weight(saved):
    state = load_file(str(saved / "model.safetensors"))
    state["extra.bias"] = torch.zeros(3)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected key 'extra.bias'"):
        load(saved)


def test_checkpoint_missing_file(saved):
    (saved / "stats.json").unlink()
    with pytest.raises(CheckpointError, match=r"lacks stats.json"):
        load(saved)


def test_checkpoint_corrupt_weights(saved):
    (saved / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"cannot be read as safetensors"):
        load(saved)


def test_checkpoint_directory_missing(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*nowhere does not exist"):
        load(tmp_path / "nowhere")


def test_stats_of_wrong_length(saved):
    (saved / "stats.json").write_text(json.dumps({"action": {"q01": [0.0] * 3, "q99": [1.0] * 3}}))
    with pytest.raises(ValueError, match=r"action statistics q01 has shape \(3,\), expected \(7,\)"):
        load(saved)


def test_a_batch_of_zero_is_refused(model, obs):
    images, instructions, proprio = obs
    with pytest.raises(ValueError, match=r"images have shape \(0, 2, 32, 32, 3\): a batch of 0 observations"):
        model.predict_action(images[:0], [], proprio[:0])


def test_an_instruction_beyond_the_position_limit_is_refused_before_the_lm_runs(model, obs):
    images, instructions, proprio = obs
    limit = model.lm.causal_lm.config.max_position_embeddings  # 1024 in the tiny config
    others = model.sequence_length(0)
    long = "a" * 50_000
    with pytest.raises(ValueError, match=rf"instruction 1 \(50000 characters\) takes \d+ prompt tokens: the sequence "
                                         rf"would hold \d+ positions, beyond the LM's max_position_embeddings={limit}; "
                                         rf"shorten it to at most {limit - others} prompt tokens"):
        model.predict_action(images, [instructions[0], long], proprio)
    # the longest instruction that fits still runs
    fits = "a" * (limit - others - len(model.tokenizer("In: What action should the robot take to ?\nOut:")["input_ids"]))
    assert model.predict_action(images, [instructions[0], fits], proprio).shape[0] == 2
    state = model.lm_input(images[:1], [fits], proprio[:1])
    assert state.hidden.shape[1] == limit == model.sequence_length(state.layout.prompt)
