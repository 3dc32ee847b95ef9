"""KV-cache compression of the expert head's cache, one module per method: `kv_streaming`
(StreamingLLM, streaming.py), `kv_h2o` (H2O, h2o.py) and `kv_quant` (KIVI, kivi.py); base.py holds
the compressor protocol and the eviction, step.py the recipe steps."""

from vlaopt.optimize.kv import step  # noqa: F401  (registers the kv steps)
