"""Why gate_norm drops the wrong attention sublayers of SmolLM2-135M: per decoder layer, the gate_norm
score (raw weights, as the paper scores them), the same score with the pre-attention RMSNorm gain
folded into W_q and W_k, the mean |gain|, |W_q|_F and |W_k|_F, and the perplexity ratio of dropping
that one attention sublayer (the damage the score should predict); then each score's Spearman rank
correlation with the damage. Writes JSON (default benchmarks/results/gate_norm_smollm2.json).

    python scripts/gate_norm_layers.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import pydoc_data
from pathlib import Path

import torch

from vlaopt.bench.compress_lm import carrier
from vlaopt.bench.machine import machine_info
from vlaopt.data.text import text_windows
from vlaopt.eval.perplexity import perplexity
from vlaopt.optimize.layers.gate_norm import coupling_norms
from vlaopt.optimize.layers.remove import drop_attention
from vlaopt.utils.io import atomic_write_text

TOPICS = str(Path(pydoc_data.__file__).parent / "topics.py")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).double()


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two lists without ties."""
    ra, rb = _ranks(torch.tensor(a)), _ranks(torch.tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gate_norm_smollm2.json")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--skip", type=int, default=32, help="windows of the text before the held-out ones")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense = carrier("smollm2")
    held = text_windows(dense.tokenizer, TOPICS, args.eval_windows, args.length, skip=args.skip)
    base = perplexity(dense.lm, held)
    rows = []
    with torch.no_grad():
        for i, layer in enumerate(dense.lm.decoder.layers):
            attention = copy.deepcopy(layer.self_attn)
            gain = layer.input_layernorm.weight
            raw = coupling_norms(attention).mean().item()
            row = {"layer": i, "gate_norm": raw, "q_norm_fro": attention.q_proj.weight.norm().item(),
                   "k_norm_fro": attention.k_proj.weight.norm().item(), "gain_mean_abs": gain.abs().mean().item()}
            attention.q_proj.weight.mul_(gain[None, :])
            attention.k_proj.weight.mul_(gain[None, :])
            row["gate_norm_gain_folded"] = coupling_norms(attention).mean().item()
            model = copy.deepcopy(dense)
            drop_attention(model, [i])
            row["perplexity_ratio_alone"] = perplexity(model.lm, held) / base
            rows.append(row)
            print(" ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    damage = [r["perplexity_ratio_alone"] for r in rows]
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": machine_info(),
              "threads": args.threads, "text": TOPICS, "dense_perplexity": base, "windows": args.eval_windows,
              "length": args.length, "skip": args.skip, "rows": rows,
              "spearman_with_damage": {k: spearman([r[k] for r in rows], damage)
                                       for k in ("gate_norm", "gate_norm_gain_folded", "gain_mean_abs")}}
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(result["spearman_with_damage"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
