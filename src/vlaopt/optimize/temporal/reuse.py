"""Temporal reuse across control steps (VLA-Cache): a session that keeps last step's visual tokens
and decoder keys/values, and recomputes only what changed.

Each step compares every camera patch with the pixels its keys/values were computed from (static.py).
A camera whose patches are all static skips the vision encoder; its visual tokens are last step's. In the decoder, the
static patches that the prompt did not attend most last step (and that were kept by the model's
token pruning) leave the sequence at `start_layer`: from there on each layer computes only the other
tokens, which attend to those patches' cached keys/values placed in the layer's cache (seen causally,
by position). Two modes:

- `approximate` (VLA-Cache): every such patch reuses its old keys/values from `start_layer` on, even
  when an earlier patch changed, so they are stale by what changed before them.
- `exact`: only what is provably unchanged. The sequence is [BOS][visual][proprio][prompt], so the
  keys/values of a visual prefix whose inputs are unchanged do not depend on anything after it:
  exact reuse takes, at every layer, the longest run of leading visual tokens that are static and
  are the same tokens as last step, and static patches of a re-encoded camera keep last step's
  visual tokens, so that those inputs are unchanged bit for bit.

Every `refresh` steps the session recomputes everything, bounding the drift. `stats` reports the
step's static patches, reused tokens, cameras encoded and decoder layers that read reused keys.

Deviations from the authors' code, on purpose: VLA-Cache compares each patch with the previous frame,
so a patch that drifts a little every step stays "static" and its keys/values grow ever older; we
compare with the frame they were computed from, so the drift a reuse hides stays within the threshold
(tests/test_temporal.py). VLA-Cache grows the reused set at four fixed layers (2, 6, 9, 11 of 32) by
an attention-entropy schedule; we reuse one set from `start_layer` on (our LMs have 6 layers). They
always run the vision encoder; we skip a camera that is entirely static.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vlaopt.model.hooks import LayerHook
from vlaopt.model.kv_cache import KVCache
from vlaopt.model.language import attention_of
from vlaopt.model.layout import TokenState
from vlaopt.model.session import Session
from vlaopt.optimize.temporal.static import cosine, patchify, prompt_attention, static_patches, top_k_stable
from vlaopt.optimize.tokens.base import keep_visual, to_front
from vlaopt.utils.timer import NULL_TIMER, Timer

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA

MODES = ("exact", "approximate")


@dataclass
class TemporalReuseConfig:
    """`mode` (exact | approximate); a patch is static when its cosine similarity to the previous
    frame is at least `threshold`, for at most the `max_static` most similar fraction of a camera's
    patches; the `relevant` fraction of each camera's patches the prompt attended most at decoder
    layer `relevance_layer` (default: the middle one) is never reused (0: no such filter); reuse
    starts at decoder layer `start_layer` (approximate; exact reuses at every layer); everything is
    recomputed every `refresh` steps (0: only at an episode's first). Defaults are VLA-Cache's
    (0.996, 150 and 120 of 256 patches)."""

    mode: str = "approximate"
    threshold: float = 0.996
    max_static: float = 150 / 256
    relevant: float = 120 / 256
    relevance_layer: int | None = None
    start_layer: int = 1
    refresh: int = 10

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"temporal_reuse mode={self.mode!r} is not supported; expected one of {', '.join(MODES)}")
        if not -1 <= float(self.threshold) <= 1:
            raise ValueError(f"temporal_reuse threshold={self.threshold!r} must be a cosine similarity in [-1, 1]")
        for name in ("max_static", "relevant"):
            if not 0 <= float(getattr(self, name)) <= 1:
                raise ValueError(f"temporal_reuse {name}={getattr(self, name)!r} must be a fraction in [0, 1]")
        for name in ("start_layer", "refresh"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"temporal_reuse {name}={value!r} must be a non-negative integer")
        if self.relevance_layer is not None and (not isinstance(self.relevance_layer, int) or self.relevance_layer < 0):
            raise ValueError(f"temporal_reuse relevance_layer={self.relevance_layer!r} must be a non-negative integer")

    @property
    def first_layer(self) -> int:
        """The first decoder layer that reads reused keys/values."""
        return 0 if self.mode == "exact" else self.start_layer


def check_model(model: VLA, cfg: TemporalReuseConfig) -> tuple[list[int], int]:
    """The attention layers (`layer_idx`) that read reused keys/values and the decoder layer whose
    attention ranks relevance; raises naming what in `model` cannot run with temporal reuse."""
    layers = list(model.lm.decoder.layers)
    first = cfg.first_layer
    if first >= len(layers):
        raise ValueError(f"temporal_reuse start_layer={first} is past the LM's {len(layers)} decoder layers")
    if model.config.full_attention:
        raise ValueError("temporal_reuse keeps keys/values that depend only on earlier tokens, but this model has "
                         "full_attention (every token sees the later ones: OpenVLA-OFT); it cannot reuse them")
    if model.runner is not None:
        raise ValueError("temporal_reuse runs the layer loop eagerly between steps; this model is compiled (a "
                         "compile step): put temporal_reuse on the model without it")
    if model.kv_compressor is not None:
        raise ValueError(f"temporal_reuse looks last step's keys up by position in its cache, but {model.kv_compressor.name} "
                         "compresses that cache; use one of them")
    for hook in model.lm.hooks:
        if hook.merges_tokens:
            raise ValueError(f"temporal_reuse matches tokens to patches by position, but {hook.name} merges visual "
                             "tokens; use a pruner that keeps tokens (lightvla, fastv, divprune, random)")
        late = [i for i in (hook.layer, *hook.observed_layers()) if i > first or (i == first and i != hook.layer)]
        if late:
            raise ValueError(f"{hook.name} acts at decoder layer {max(late)}, after layer {first}, where temporal_reuse "
                             f"(mode {cfg.mode}) drops reused tokens; prune at or before layer {first}")
    reading = [attention_of(layer).layer_idx for layer in layers[first:] if attention_of(layer) is not None]
    if not reading:
        raise ValueError(f"temporal_reuse: no decoder layer from {first} on has attention left to read reused keys")
    relevance = len(layers) // 2 if cfg.relevance_layer is None else cfg.relevance_layer
    if cfg.relevant > 0 and (relevance >= len(layers) or attention_of(layers[relevance]) is None):
        raise ValueError(f"temporal_reuse relevance_layer={relevance} names no decoder layer with attention "
                         f"(the LM has {len(layers)} layers)")
    return reading, relevance


@dataclass
class _Memory:
    """What a step leaves for the next: per patch the pixels its keys/values were computed from,
    the visual tokens, the cache, and per visual token whether it had keys/values at the reusing
    layers, the order of those tokens (exact mode) and whether the prompt attended it most (never
    reused next step)."""

    frames: tuple[int, ...]
    reference: torch.Tensor  # (B, cams, patches, patch * patch * 3) float32 pixels
    instructions: list[str]
    visual: torch.Tensor
    cache: KVCache
    present: torch.Tensor  # (B, Nv) bool
    order: torch.Tensor  # (B, K) positions of the present visual tokens, ascending; -1 pads
    relevant: torch.Tensor  # (B, Nv) bool
    since_full: int


class _Reuse(LayerHook):
    """The per-step hook at the first reusing layer: drops the reused visual tokens from the state
    and places their stored keys/values in this step's cache; observes the relevance layer's attention."""

    name = "temporal_reuse"

    def __init__(self, session: ReuseSession, cache: KVCache, candidates: torch.Tensor | None) -> None:
        super().__init__(session.cfg.first_layer)
        self.session, self.cache, self.candidates = session, cache, candidates
        self.reused_tokens: torch.Tensor | None = None  # (B, Nv) which visual tokens were reused; None: none
        self.attention: torch.Tensor | None = None

    def observed_layers(self) -> tuple[int, ...]:
        return (self.session.relevance_layer,) if self.session.cfg.relevant > 0 else ()

    def observe_attention(self, layer: int, state: TokenState, query: torch.Tensor, key: torch.Tensor,
                          mask: torch.Tensor, scaling: float | None) -> None:
        index = attention_of(self.session.model.lm.decoder.layers[layer]).layer_idx
        prompt = state.layout.span("prompt")
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        attention = prompt_attention(query[:, :, prompt], key, mask[:, :, prompt], scale, state.valid[:, prompt])
        self.attention = self.session.per_visual(self.cache.positions[index], self.cache.valid[index], attention)

    def forward(self, state: TokenState) -> TokenState:
        span = state.layout.span("visual")
        positions, valid = state.position_ids[:, span], state.valid[:, span]
        if self.candidates is None:
            self.reused_tokens = None
            return state
        nv = self.candidates.shape[1]
        reuse = self.candidates.gather(1, (positions - 1).clamp(0, nv - 1)) & valid
        memory = self.session.memory
        if self.session.cfg.mode == "exact":
            same = torch.zeros_like(reuse)
            n = min(reuse.shape[1], memory.order.shape[1])
            same[:, :n] = positions[:, :n] == memory.order[:, :n]
            reuse = (reuse & same).long().cumprod(1).bool()
        self.reused_tokens = self.session.per_visual(positions, reuse)
        if not bool(reuse.any()):
            return state
        picked, picked_valid = to_front(reuse)
        picked_positions = positions.gather(1, picked)
        old = memory.cache
        first = self.session.reading[0]
        slots = _slot_of(old.positions[first], old.valid[first], picked_positions)
        for index in self.session.reading:
            gather = slots[:, None, :, None].expand(-1, old.keys[index].shape[1], -1, old.keys[index].shape[-1])
            self.cache.put(index, old.keys[index].gather(2, gather), old.values[index].gather(2, gather),
                           picked_valid, picked_positions)
        return keep_visual(state, valid & ~reuse)


def _slot_of(positions: torch.Tensor, valid: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Index of each `wanted` position (B, R) among the valid cache slots at `positions` (B, S)."""
    size = int(max(positions.max(), wanted.max())) + 2
    lookup = torch.zeros(positions.shape[0], size, dtype=torch.long, device=positions.device)
    where = torch.where(valid, positions, size - 1)
    lookup.scatter_(1, where, torch.arange(positions.shape[1], device=positions.device).expand_as(where))
    return lookup.gather(1, wanted)


class ReuseSession(Session):
    """A session with temporal reuse; see the module docstring."""

    def __init__(self, model: VLA, cfg: TemporalReuseConfig) -> None:
        super().__init__(model)
        self.cfg = cfg
        self.reading, self.relevance_layer = check_model(model, cfg)
        self.patch = model.config.token_patch  # the pixels one visual token stands for
        self.patches = (model.config.vision.image_size // self.patch) ** 2
        self.memory: _Memory | None = None

    def reset(self) -> None:
        super().reset()
        self.memory = None

    def per_visual(self, positions: torch.Tensor, valid: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Scatter per-slot `values` (B, S) (default: True) of the visual tokens among slots at
        `positions` (B, S) to one entry per visual token (B, Nv); absent tokens get 0 / False."""
        nv = self.model.config.cameras * self.patches
        visual = valid & (positions >= 1) & (positions <= nv)
        index = torch.where(visual, positions - 1, nv)
        if values is None:
            values = torch.ones_like(visual)
        out = values.new_zeros(positions.shape[0], nv + 1)
        return out.scatter(1, index, torch.where(visual, values, torch.zeros_like(values)))[:, :nv]

    def _previous(self, images: torch.Tensor, instructions: list[str]) -> _Memory | None:
        """The memory this step may reuse, or None for a full step."""
        memory = self.memory
        if memory is None:
            return None
        if memory.frames != tuple(images.shape):
            raise ValueError(f"this session's last step had images of shape {memory.frames}, this one "
                             f"{tuple(images.shape)}; call reset() before stepping another batch")
        if memory.instructions != instructions or (self.cfg.refresh and memory.since_full + 1 >= self.cfg.refresh):
            return None
        return memory

    @torch.inference_mode()
    def step(self, images: Any, instructions: Any, proprio: Any = None, *, noise: torch.Tensor | None = None,
             seed: int = 0, timer: Timer | None = None) -> torch.Tensor:
        model = self.model
        timer = timer or NULL_TIMER
        with timer.stage("inputs"):
            inputs = model.preprocess(images, instructions, proprio)
        memory = self._previous(inputs.images, inputs.instructions)
        batch, cams = inputs.images.shape[:2]
        with timer.stage("vision"):
            pixels = patchify(inputs.images, self.patch)
        stats: dict[str, Any] = {"full": memory is None, "visual": cams * self.patches, "static": 0.0,
                                 "encoded_cameras": batch * cams}
        candidates = fresh = None
        if memory is None:
            visual = model.visual_tokens(inputs.images, timer)
        else:
            visual, static, fresh = self._visual(inputs.images, pixels, memory, timer, stats)
            candidates = static.reshape(batch, -1) & memory.present & ~memory.relevant
        state = model.encode(inputs, timer, visual)
        cache = KVCache()
        hook = _Reuse(self, cache, candidates)
        actions = model.policy.act(model, state, noise, seed, timer, cache, [*model.lm.hooks, hook])
        self._remember(inputs.images, pixels, fresh, inputs.instructions, visual, cache, hook, memory)
        reused = 0.0 if hook.reused_tokens is None else hook.reused_tokens.sum(1).float().mean().item()
        stats.update(reused=reused, layers=len(self.reading) if reused else 0)
        self.stats = stats
        self.history.append(stats)
        return model.unnormalize(actions)

    def _visual(self, images: torch.Tensor, pixels: torch.Tensor, memory: _Memory, timer: Timer,
                stats: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's visual tokens (last step's for every camera that is entirely static), the static
        patches (B, cams, patches), similar to the pixels their keys/values came from, and the patches
        whose visual tokens were encoded from this frame."""
        model, cfg = self.model, self.cfg
        with timer.stage("vision"):
            similarity = cosine(memory.reference, pixels)
            static = static_patches(similarity, cfg.threshold, round(cfg.max_static * self.patches))
            todo = (~static.all(-1)).nonzero()
        visual = memory.visual.clone()
        grid = visual.view(images.shape[0], images.shape[1], self.patches, -1)
        fresh = torch.zeros_like(static)
        if len(todo):
            b, c = todo[:, 0], todo[:, 1]
            encoded = model.visual_tokens(images[b, c][:, None], timer)
            fresh[b, c] = ~static[b, c] if cfg.mode == "exact" else True
            grid[b, c] = torch.where(fresh[b, c][..., None], encoded, grid[b, c])
        stats.update(static=static.sum((1, 2)).float().mean().item(), encoded_cameras=len(todo))
        return visual, static, fresh

    def _remember(self, images: torch.Tensor, pixels: torch.Tensor, fresh: torch.Tensor | None, instructions: list[str],
                  visual: torch.Tensor, cache: KVCache, hook: _Reuse, memory: _Memory | None) -> None:
        """Keep this step for the next. A patch's reference pixels move to this frame only where its
        visual token was encoded from it and its keys/values were recomputed."""
        first = self.reading[0]
        positions, valid = cache.positions[first], cache.valid[first]
        present = self.per_visual(positions, valid)
        nv = present.shape[1]
        ordered = torch.where(valid & (positions >= 1) & (positions <= nv), positions, nv + 1).sort(1).values
        order = ordered.masked_fill(ordered > nv, -1)
        relevant = torch.zeros_like(present)
        if self.cfg.relevant > 0 and hook.attention is not None:
            k = round(self.cfg.relevant * self.patches)
            grid = hook.attention.reshape(images.shape[0], images.shape[1], self.patches)
            relevant = top_k_stable(grid, k).reshape(present.shape)
        since = 0 if memory is None else memory.since_full + 1
        reference = pixels
        if memory is not None:
            old = ~fresh
            if hook.reused_tokens is not None:
                old = old | hook.reused_tokens.reshape(old.shape)
            reference = torch.where(old[..., None], memory.reference, pixels)
        self.memory = _Memory(tuple(images.shape), reference, list(instructions), visual, cache, present, order,
                              relevant, since)
