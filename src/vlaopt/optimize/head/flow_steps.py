"""The `flow_steps` recipe step: `- flow_steps: {n: 4}` sets the number of integration steps of a
flow or expert head (each an expert / denoiser pass; a midpoint step costs two), or of DDIM steps of
a diffusion head. Only the head's loop changes, no weights: pi0's 10 steps take 27 of its 73 ms.

The model's head config is replaced by a validated copy with the new count (the head reads it), so
the count is saved in `config.json`; the recorded step replays the same count when the model is
rebuilt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlaopt.config import HEAD_CONFIGS
from vlaopt.optimize.recipe import STEPS, RecipeStep, make_config

if TYPE_CHECKING:
    from vlaopt.model.vla import VLA


@dataclass
class FlowStepsConfig:
    """The number of steps the head integrates (flow, expert) or denoises (diffusion, DDIM) in."""

    n: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n <= 0:
            raise ValueError(f"flow_steps n={self.n!r} must be a positive integer")


@STEPS.register("flow_steps")
class FlowStepsStep(RecipeStep):
    """Set `head.steps` of a stepped head."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {FlowStepsConfig: None}

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        cfg = make_config(FlowStepsConfig, params, "flow_steps")
        head = model.config.head
        stepped = [name for name in HEAD_CONFIGS.names() if "steps" in {f.name for f in dataclasses.fields(
            HEAD_CONFIGS.get(name))}]
        if head.kind not in stepped:
            raise ValueError(
                f"flow_steps applies to heads that sample in steps ({', '.join(stepped)}); "
                f"this model's head is {head.kind!r}"
            )
        if head.kind == "diffusion" and cfg.n > head.train_timesteps:
            raise ValueError(
                f"flow_steps n={cfg.n} exceeds the diffusion head's train_timesteps={head.train_timesteps} (DDIM "
                "steps are a subset of the training timesteps)"
            )
        model.config.head = model.head.cfg = dataclasses.replace(head, steps=cfg.n)  # validated like any head config
        return dataclasses.asdict(cfg)

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        self.apply(model, resolved)
