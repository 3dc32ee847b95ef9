"""The `compile` recipe step: `- compile: {backend: inductor, mode: default, dynamic: false}`.

It compiles the model's whole network with `torch.compile`: everything after the processor (vision,
projector, the layer loop with its hooks, the head or the expert's flow steps), installed as the
model's `runner`, so `predict_action` checks and tokenizes the inputs eagerly and runs the rest
compiled (timed as one stage, `network`). Semantics:

- Compilation is lazy: the first call with a new input shape traces and compiles (seconds to a minute
  on CPU), later calls with the same shapes replay it. With `dynamic: false` (static shapes, the
  default) each batch size, prompt length and kept-token count gets its own graph; `dynamic: true`
  compiles shape-generic graphs instead. Prompts are padded (masked) to a multiple of `prompt_multiple`
  tokens (default 16), so the ten MT10 instructions (60-88 prompt tokens on `medium`) meet 3 prompt
  lengths (64, 80, 96), not ten (dynamo's limit per function is 8: past it, calls run eagerly).
- Where the network does something the compiler cannot trace (a data-dependent token count, the
  seeded noise generator), it splits into several graphs with eager code between them (`fullgraph:
  true` makes that an error instead).
- Recompilation is never silent: `CompiledNetwork` counts every graph the backend compiles
  (`compiles`) and the calls after which new graphs appeared (`recompiled_calls`); `vla-opt bench`
  reports both and the first call's time.
- The step is recorded like any other and re-applied by `vlaopt.load` (it changes no weights, so a
  compiled model saves the same files as the eager one and recompiles on its first call after load).
  It must be the last step: steps after it would change modules under a traced graph, and are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from types import FunctionType, MethodType
from typing import TYPE_CHECKING, Any

import torch

from vlaopt.optimize.recipe import STEPS, RecipeStep, make_config

if TYPE_CHECKING:
    from vlaopt.model.processor import ModelInputs
    from vlaopt.model.vla import VLA

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's modes (for inductor; on CPU `reduce-overhead` has no CUDA graphs to capture)."""


@dataclass
class CompileConfig:
    """torch.compile's backend (inductor, or a debugging backend such as eager / aot_eager), its
    mode, whether shapes are dynamic, whether a graph break is an error, and the multiple of tokens
    prompts are padded to."""

    backend: str = "inductor"
    mode: str = "default"
    dynamic: bool = False
    fullgraph: bool = False
    prompt_multiple: int = 16

    def __post_init__(self) -> None:
        backends = torch.compiler.list_backends(exclude_tags=())
        if self.backend not in backends:
            raise ValueError(f"compile backend={self.backend!r} is not a torch.compile backend; expected one of "
                             f"{', '.join(sorted(backends))}")
        if self.mode not in MODES:
            raise ValueError(f"compile mode={self.mode!r}; expected one of {', '.join(MODES)}")
        if self.mode != "default" and self.backend != "inductor":
            raise ValueError(f"compile mode={self.mode!r} is an inductor mode, but backend={self.backend!r}")
        for name in ("dynamic", "fullgraph"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"compile {name}={getattr(self, name)!r} must be true or false")
        if isinstance(self.prompt_multiple, bool) or not isinstance(self.prompt_multiple, int) or self.prompt_multiple < 1:
            raise ValueError(f"compile prompt_multiple={self.prompt_multiple!r} must be a positive integer (1: no padding)")


def own_code(method: MethodType) -> MethodType:
    """`method` rebound to a copy of its code object. Dynamo keeps its compiled graphs (and its limit of
    8 per function) on the code object, which every VLA shares: without a copy, compiled models would
    reuse each other's graphs (uncounted here) and the ninth would silently run eagerly."""
    func = method.__func__
    copy_ = FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    copy_.__kwdefaults__ = func.__kwdefaults__
    return MethodType(copy_, method.__self__)


class CompiledNetwork:
    """`model.network` compiled with `cfg`; counts the graphs its backend compiles (see the module docstring)."""

    def __init__(self, model: VLA, cfg: CompileConfig) -> None:
        self.model, self.cfg = model, cfg
        self.compiles = 0  # graphs compiled so far (graph breaks and new shapes add graphs)
        self.calls = 0
        self.recompiled_calls = 0  # calls after the first that compiled something
        self.first_call_s: float | None = None
        self._inner = self._backend()
        self._fn = torch.compile(own_code(model.network), backend=self._count, dynamic=cfg.dynamic,
                                 fullgraph=cfg.fullgraph)

    def _backend(self) -> Any:
        if self.cfg.backend == "inductor":
            # the same object torch.compile builds for backend="inductor", mode=...; wrapped to count
            return torch._TorchCompileInductorWrapper(self.cfg.mode, None, self.cfg.dynamic)
        return torch._dynamo.lookup_backend(self.cfg.backend)

    def _count(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.compiles += 1
        return self._inner(graph, example_inputs)

    def __call__(self, inputs: ModelInputs, noise: torch.Tensor | None, seed: int) -> torch.Tensor:
        before, start = self.compiles, time.perf_counter()
        out = self._fn(inputs, noise, seed)
        if self.calls == 0:
            self.first_call_s = time.perf_counter() - start
        elif self.compiles > before:
            self.recompiled_calls += 1
        self.calls += 1
        return out

    def stats(self) -> dict[str, Any]:
        """What the compiler did so far, for reports."""
        return {"compiles": self.compiles, "calls": self.calls, "recompiled_calls": self.recompiled_calls,
                "first_call_s": self.first_call_s, **dataclasses.asdict(self.cfg)}

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledNetwork:
        """A fresh (not yet compiled) runner of the copied model: compiled code is not copied."""
        return CompiledNetwork(copy.deepcopy(self.model, memo), self.cfg)


@STEPS.register("compile")
class CompileStep(RecipeStep):
    """Install a `CompiledNetwork` as the model's runner (no weights change)."""

    @classmethod
    def config_classes(cls) -> dict[type, str | None]:
        return {CompileConfig: None}

    def apply(self, model: VLA, params: dict[str, Any]) -> dict[str, Any]:
        cfg = make_config(CompileConfig, params, "compile")
        model.runner = CompiledNetwork(model, cfg)
        model.processor.prompt_multiple = cfg.prompt_multiple
        return dataclasses.asdict(cfg)

    def rebuild(self, model: VLA, resolved: dict[str, Any]) -> None:
        self.apply(model, resolved)
