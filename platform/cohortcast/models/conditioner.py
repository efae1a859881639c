"""LLM conditioner with soft prompts (NAMD Sec. 3.3.1, Eq. 7-8).

The LM is frozen; only the m soft-prompt vectors train. Texts are tokenised, their
embeddings looked up, and the soft prompts placed in front of the first real token.
Rows are re-packed to "soft prompts, real tokens, padding" whatever side the tokenizer
pads on, so every real token sits at the same position it would have alone and the
pooled vector - the last layer's hidden state at the last real token, the only one that
attends to everything under causal attention - does not depend on the batch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cohortcast.config.models import ConditionerConfig
from cohortcast.models.local_weights import local_model_folder

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_frozen_lm(cfg: ConditionerConfig):
    """Base model (no LM head: no vocabulary-sized logits) and tokenizer from a local folder."""
    from transformers import AutoModel, AutoTokenizer

    path = local_model_folder(cfg.llm_path, "model.conditioner.llm_path")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=_DTYPES[cfg.dtype])
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


class SoftPromptConditioner(nn.Module):
    def __init__(self, cfg: ConditionerConfig, lm: nn.Module | None = None, tokenizer=None):
        super().__init__()
        if lm is None:
            lm, tokenizer = load_frozen_lm(cfg)
        self.cfg = cfg
        self.tokenizer = tokenizer
        # Kept out of the module tree: the frozen LM is neither trained nor saved with
        # the Forecaster (it is re-loaded from llm_path), only the soft prompts are.
        self._lm = [lm]
        embeddings = lm.get_input_embeddings()
        self.hidden_size = embeddings.embedding_dim
        with torch.no_grad():
            std = embeddings(torch.arange(min(256, embeddings.num_embeddings))).float().std().item()
        self.soft_prompts = nn.Parameter(torch.randn(cfg.num_soft_prompts, self.hidden_size) * std)

    @property
    def lm(self) -> nn.Module:
        return self._lm[0]

    def to(self, *args, **kwargs):  # the frozen LM is outside the module tree: move it too
        self.lm.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def encode_records(self, records) -> torch.Tensor:
        """EHR records (manifest column names) -> (B, hidden_size): rendered as the NAMD
        report prompt, then read by the LM."""
        from cohortcast.models.ehr_prompt import render_ehr_prompt

        return self(texts=[render_ehr_prompt(r) for r in records])

    def forward(self, texts: list[str]) -> torch.Tensor:
        """texts -> (B, hidden_size) pooled context embeddings."""
        device = self.soft_prompts.device
        padding = "max_length" if self.cfg.pad_to_max_length else True
        enc = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        )
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()
        # Real tokens first, padding last, order kept (stable sort on "is padding").
        order = torch.sort((~mask).int(), dim=1, stable=True).indices
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        lengths = mask.sum(1)
        if (lengths == 0).any():
            raise ValueError("an EHR text tokenised to nothing")
        lm_dtype = next(self.lm.parameters()).dtype
        tokens = self.lm.get_input_embeddings()(ids)  # (B, L, H), Gemma's embedding scale applied
        batch, m = ids.shape[0], self.soft_prompts.shape[0]
        prompts = self.soft_prompts.to(lm_dtype).unsqueeze(0).expand(batch, -1, -1)
        inputs = torch.cat([prompts, tokens], dim=1)
        attention = torch.cat([torch.ones(batch, m, dtype=torch.long, device=device), mask.long()], dim=1)
        hidden = self.lm(inputs_embeds=inputs, attention_mask=attention).last_hidden_state  # (B, m + L, H)
        return hidden[torch.arange(batch, device=device), m + lengths - 1].float()
