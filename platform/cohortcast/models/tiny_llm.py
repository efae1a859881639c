"""A tiny randomly initialised Gemma 3 causal LM and a word-level tokenizer, built
offline and saved to a local folder in the Hugging Face layout, so tests and the debug
config load it through exactly the code path production uses for MedGemma."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch


def write_tiny_gemma3(
    folder: str | Path, corpus: Iterable[str], hidden_size: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    folder = Path(folder)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for text in corpus:
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    config = Gemma3TextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=512,
        sliding_window=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
