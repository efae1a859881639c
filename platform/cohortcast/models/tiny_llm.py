"""Tiny randomly initialised causal LMs (Gemma 3 for the NAMD conditioner, GPT-2 for the
CLDM report decoder) and word-level tokenizers, built offline and saved to a local folder
in the Hugging Face layout, so tests and the debug config load them through exactly the
code path production uses for MedGemma / BioGPT."""

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


def report_tokenizer(corpus: Iterable[str]):
    """A word-level tokenizer over `corpus` that decodes back to the exact text (case,
    punctuation, spacing and newlines kept): words carry their leading space as "▁"
    (Metaspace) and punctuation is split off, so "FINDINGS: No effusion.\\nIMPRESSION: ..."
    round-trips. Special tokens <pad> 0, <eos> 1, <bos> 2, <unk> 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for text in corpus:
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def write_tiny_gpt2(
    folder: str | Path, corpus: Iterable[str], hidden_size: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """A tiny randomly initialised GPT-2 (no dropout) + report_tokenizer(corpus), saved in
    the Hugging Face layout: the report decoder loads it through the production path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    tokenizer = report_tokenizer(corpus)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=hidden_size,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
