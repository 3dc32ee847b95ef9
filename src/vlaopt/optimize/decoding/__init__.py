"""Faster decoding of reasoning text: the `speculative` step (self-speculative and n-gram drafts)."""

from vlaopt.optimize.decoding import step  # noqa: F401  (registers the speculative step)
