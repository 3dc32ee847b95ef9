"""The `model` draft: a small transformer of the LM's family, distilled from the policy's LM
(DistillSpec, Zhou et al. 2023; distill.py) to propose its reasoning tokens.

It is built like the action expert (heads/expert.py): HF decoder layers from a copy of the LM config,
with the LM's query / key-value heads, head_dim and RoPE (1 layer by default, optionally its own MLP
width), no embedding of its own. Its input is the LM's token embedding and its output goes through
the LM's final-norm-shaped norm of its own and the LM's head (shared, as EAGLE shares them). Each
draft layer attends to the keys/values the VLM cached at one attention layer (`read_layer`, the last
by default) for the prefix and every accepted token, followed by its own keys/values of the tokens it
fed in this round. Since the verifier puts every accepted token into the VLM cache, the draft keeps
no cache across rounds and never catches up: it sees the images, the prompt and the text so far
through the VLM's keys, as the expert does.

A draft is saved as a folder (`save_draft`): config.json (format, read layer, depth, MLP width, the
LM geometry it was built for, the distillation record) and model.safetensors (its own weights; the
shared embedding and head stay in the VLA). `load_draft` checks the folder and the geometry.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PretrainedConfig

from vlaopt.model.decode import pick
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import LanguageModel, attention_of, call_layer
from vlaopt.optimize.decoding.drafts.base import DRAFTS, Scores
from vlaopt.utils.files import read_json
from vlaopt.utils.io import fsync_path

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA

DRAFT_FORMAT, DRAFT_VERSION = "vlaopt-draft", 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
GEOMETRY = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


def attention_layers(lm: LanguageModel) -> list[int]:
    """The `layer_idx` of every attention module of the LM, in order (dropped sublayers left out)."""
    return [a.layer_idx for a in (attention_of(layer) for layer in lm.decoder.layers) if a is not None]


def geometry(lm: LanguageModel) -> dict[str, Any]:
    """What a draft must agree with: the LM's family, widths, heads and vocabulary."""
    cfg = lm.causal_lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": head_dim, "vocab_size": lm.vocab_size}


def draft_config(lm_config: PretrainedConfig, depth: int, mlp: int = 0) -> PretrainedConfig:
    """The draft's HF config: the LM's family, width, attention geometry and RoPE; `depth` layers and
    MLP width `mlp` (0: the LM's)."""
    cfg = copy.deepcopy(lm_config)
    cfg.head_dim = getattr(lm_config, "head_dim", None) or lm_config.hidden_size // lm_config.num_attention_heads
    cfg.intermediate_size = mlp or lm_config.intermediate_size
    cfg.num_hidden_layers = depth
    cfg.vocab_size = 1  # the embedding is deleted: the LM's is shared
    cfg.pad_token_id = None
    cfg.tie_word_embeddings = False
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * depth  # our mask decides what each token sees
    return cfg


class DraftKV:
    """What the draft's attention modules see as their cache: the VLM's cached keys/values (B, KV, S,
    hd) of the read layer, followed by the draft's own keys/values of the tokens fed so far in this
    round (kept per draft layer, dropped with this object)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self.own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: object,
               **__: object) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.own:
            k, v = self.own[layer_idx]
            key_states, value_states = torch.cat([k, key_states], 2), torch.cat([v, value_states], 2)
        self.own[layer_idx] = (key_states, value_states)
        return torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)


class DraftNet(nn.Module):
    """The draft network of an LM (see the module doc). `read_layer` indexes the LM's attention layers
    as a Python list (-1: the last); `read` is the `layer_idx` it resolves to, whose cached keys and
    values every draft layer reads."""

    def __init__(self, lm: LanguageModel, read_layer: int = -1, layers: int = 1, mlp: int = 0) -> None:
        super().__init__()
        for name, value, low in (("read_layer", read_layer, None), ("layers", layers, 1), ("mlp", mlp, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                kind = "an integer" if low is None else ("a positive integer" if low else "a non-negative integer")
                raise ValueError(f"draft {name}={value!r} must be {kind}")
        width, embed, head = lm.hidden_size, lm.decoder.embed_tokens.weight.shape[1], lm.readout().shape[1]
        if not embed == head == width:
            raise ValueError(f"the model draft shares the LM's token embedding (width {embed}) and LM head (width "
                             f"{head}) at the decoder width {width}; {lm.causal_lm.config.model_type} LMs whose widths "
                             "differ cannot have one")
        attn = attention_layers(lm)
        if not -len(attn) <= read_layer < len(attn):
            raise ValueError(f"draft read_layer={read_layer}: the LM has {len(attn)} attention layers; expected "
                             f"{-len(attn)} to {len(attn) - 1}")
        self.read_layer, self.read, self.layers, self.mlp = read_layer, attn[read_layer], layers, mlp
        self.geometry = geometry(lm)
        self.body = AutoModel.from_config(draft_config(lm.causal_lm.config, layers, mlp), attn_implementation="sdpa")
        del self.body.embed_tokens  # the LM's embedding is shared
        self.history: list[float] = []  # distillation loss per step (distill.py)

    def init_from(self, lm: LanguageModel) -> None:
        """Start from the LM's decoder layer at the read layer (every draft layer; the MLP only when its
        width is the LM's) and its final norm: a draft that already reads the cache like that layer."""
        source = next(layer for layer in lm.decoder.layers
                      if attention_of(layer) is not None and attention_of(layer).layer_idx == self.read)
        weights = source.state_dict()
        with torch.no_grad():
            for layer in self.body.layers:
                own = layer.state_dict()
                layer.load_state_dict({k: v for k, v in weights.items() if k in own and own[k].shape == v.shape},
                                      strict=False)
            self.body.norm.load_state_dict(lm.decoder.norm.state_dict())

    def hidden(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: DraftKV) -> torch.Tensor:
        """Normed output states (B, T, D) of input embeddings `x` (B, T, D) at original `positions`
        (B, T) with the boolean `mask` (B, 1, T, S + T_own) over the VLM keys of `kv` and the draft's
        own tokens (those of earlier calls on `kv`, then these)."""
        rotary = self.body.rotary_emb(x, position_ids=positions)
        for layer in self.body.layers:
            x = call_layer(layer, x, mask, positions, rotary, kv)
        return self.body.norm(x)

    def matches(self, lm: LanguageModel) -> None:
        """Raise unless this draft was built for an LM of `lm`'s geometry whose cache holds its read layer."""
        got = geometry(lm)
        wrong = [f"{k}={self.geometry[k]!r} (the LM has {got[k]!r})" for k in GEOMETRY if self.geometry[k] != got[k]]
        if wrong:
            raise ValueError(f"the draft was built for another LM: {', '.join(wrong)}")
        if self.read not in attention_layers(lm):
            raise ValueError(f"the draft reads the KV of VLM attention layer {self.read}, but the LM's attention "
                             f"layers are {attention_layers(lm)}")


def build_draft(model: VLA, read_layer: int = -1, layers: int = 1, mlp: int = 0, seed: int = 0) -> DraftNet:
    """A new (undistilled) draft for `model`'s LM, initialized from its read layer (`DraftNet.init_from`),
    the rest drawn deterministically from `seed`; on the model's device and dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DraftNet(model.lm, read_layer, layers, mlp)
    net.init_from(model.lm)
    weight = model.lm.readout()
    return net.to(device=weight.device, dtype=weight.dtype)


def _is_draft_folder(path: Path) -> bool:
    try:
        return read_json(path / CONFIG_NAME, "draft config").get("format") == DRAFT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_draft(net: DraftNet, path: str | Path, record: dict[str, Any] | None = None) -> Path:
    """Write the draft as a folder at `path` (config.json with `record`, e.g. how it was distilled, and
    model.safetensors), built in a temporary folder beside it and renamed into place. An existing
    draft folder there is replaced; anything else is refused."""
    path = Path(path)
    if path.exists() and not _is_draft_folder(path):
        raise FileExistsError(f"{path} exists and is not a draft folder; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.body.state_dict().items()}, staging / WEIGHTS_NAME)
        config = {"format": DRAFT_FORMAT, "version": DRAFT_VERSION, "read_layer": net.read_layer, "read": net.read,
                  "layers": net.layers, "mlp": net.mlp, "dtype": str(net.body.norm.weight.dtype).removeprefix("torch."),
                  "lm": net.geometry, "distill": {"loss": net.history, **(record or {})}}
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            fsync_path(staging / name)
        os.chmod(staging, 0o777 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "draft")
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_draft(path: str | Path, lm: LanguageModel) -> DraftNet:
    """The draft saved at `path` (`save_draft`) for `lm`; a missing folder, one that is not a draft's,
    or a draft built for an LM of other geometry raises one ValueError naming it."""
    where = f"speculative path={str(path)!r}"
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{where}: no such draft folder; write one with scripts/distill_draft.py")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (root / name).is_file():
            raise ValueError(f"{where} is not a draft folder (it lacks {name}); write one with scripts/distill_draft.py")
    if not _is_draft_folder(root):
        raise ValueError(f"{where} is not a draft folder (its {CONFIG_NAME} is not a {DRAFT_FORMAT} config)")
    cfg = read_json(root / CONFIG_NAME, "draft config")
    if cfg.get("version") != DRAFT_VERSION:
        raise ValueError(f"{where}: draft format version {cfg.get('version')!r}; this vla-opt reads {DRAFT_VERSION}")
    saved = cfg["lm"]
    got = geometry(lm)
    wrong = [f"{k}={saved.get(k)!r} (the LM has {got[k]!r})" for k in GEOMETRY if saved.get(k) != got[k]]
    if wrong:
        raise ValueError(f"{where}: the draft was built for another LM: {', '.join(wrong)}")
    net = DraftNet(lm, cfg["read_layer"], cfg["layers"], cfg["mlp"])
    if net.read != cfg["read"]:
        raise ValueError(f"{where}: the draft reads VLM attention layer {cfg['read']}, but read_layer="
                         f"{cfg['read_layer']} is layer {net.read} of this LM")
    try:
        net.body.load_state_dict(load_file(root / WEIGHTS_NAME), strict=True)
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"{where}: {WEIGHTS_NAME} does not fit the draft its config describes: {exc}") from None
    net.history = list(cfg.get("distill", {}).get("loss", []))
    weight = lm.readout()
    return net.to(device=weight.device, dtype=weight.dtype).eval().requires_grad_(False)


@DRAFTS.register("model")
class ModelDraft:
    """The distilled draft network of the step's `path` (see the module doc)."""

    def __init__(self, model: VLA, cfg: Any) -> None:
        self.net = load_draft(cfg.path, model.lm)

    @classmethod
    def of(cls, net: DraftNet) -> ModelDraft:
        """A draft proposing with `net` (e.g. while distilling), not read from a folder."""
        out = cls.__new__(cls)
        out.net = net
        return out

    def propose(self, lm: LanguageModel, cache: KVCache, history: list[list[int]], first: torch.Tensor,
                valid: torch.Tensor, k: int, scores: Scores,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts (B, k) after `first` (B,) and their distributions q (B, k, V): the draft fed `first`
        at the next position, then each of its drafts, over the VLM cache of the read layer."""
        net, src = self.net, self.net.read
        if src not in cache.keys:
            raise ValueError(f"the draft reads the KV of VLM attention layer {src}, but the cache holds {cache.layers}")
        weight = lm.readout()
        if net.body.norm.weight.device != weight.device or net.body.norm.weight.dtype != weight.dtype:
            net.to(device=weight.device, dtype=weight.dtype)  # the VLA moved; the draft is not its submodule
        start = cache.next_position
        past = cache.valid[src] & (cache.positions[src] < start[:, None])  # (B, S): what the round starts from
        kv, ids, drafts, probs = DraftKV(cache.keys[src], cache.values[src]), first, [], []
        for i in range(k):
            mask = torch.cat([past, past.new_ones(past.shape[0], i + 1)], 1)[:, None, None, :]
            hidden = net.hidden(lm.embed(ids[:, None]), (start + i)[:, None], mask, kv)
            processed = scores(lm.lm_head(hidden)[:, 0].float())
            ids = pick(processed, generator)
            drafts.append(ids)
            probs.append(processed.softmax(-1))
        return torch.stack(drafts, 1), torch.stack(probs, 1)
