"""Tokenizers: a small built-in byte-level tokenizer for models built from scratch, or the tokenizer
of a local Hugging Face directory. Both are `transformers` fast tokenizers, saved with the model.

Built-in vocabulary: <pad>, <s>, </s>, the 256 bytes, then 256 action-bin tokens <act_i>. As in
OpenVLA, discrete action bins are the last 256 ids of the vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>")
ACTION_BINS = 256


def build_builtin_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in byte-level tokenizer (no merges: one token per UTF-8 byte)."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_alphabet):
        vocab[ch] = len(vocab)
    for i in range(ACTION_BINS):
        vocab[f"<act_{i}>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """`builtin`, a local directory holding a `transformers` tokenizer, or a `.gguf` file's tokenizer."""
    if source == "builtin":
        return build_builtin_tokenizer()
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer {source!r} does not exist (expected 'builtin', a local directory or "
                                "a .gguf file)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(bos, stop) ids; tokenizers without a BOS (e.g. Qwen) use their EOS for both."""
    stop = tokenizer.eos_token_id
    if stop is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; the action STOP token needs one")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else stop
    return bos, stop
