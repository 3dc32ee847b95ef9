"""Draft proposers for speculative decoding, one per module, registered by name (base.py):

- `self` (early_exit.py): LayerSkip-style self-speculation through the LM's first layers;
- `ngram` (ngram.py): prompt lookup over the emitted text.
- `model` (model.py): a small draft network over the VLM's cache, distilled from the LM (distill.py);
- `retrieval` (retrieval.py): REST, continuations retrieved from a datastore of reasoning texts.
"""

from vlaopt.optimize.decoding.drafts import early_exit, model, ngram, retrieval  # noqa: F401  (register the drafts)
from vlaopt.optimize.decoding.drafts.base import DRAFTS

__all__ = ["DRAFTS"]
