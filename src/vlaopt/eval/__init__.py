"""Evaluation of a VLA on MetaWorld: closed-loop rollouts (success rates with confidence intervals)
and the open-loop action error on held-out demonstrations."""
