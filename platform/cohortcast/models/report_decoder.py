"""Report decoder (CLDM Sec. 3 / Table 2): a causal language model conditioned on a
study's tokens through prefix embeddings, decoding the report autoregressively.

The paper uses BioGPT "that cross-attends to z_hat". BioGPT (like GPT-2 as released) has
no cross-attention layers, so we condition it the way any decoder-only LM accepts without
new layers inside it: `num_prefix` vectors, pooled from the study's tokens by learned
queries attending over [CLS] and the patch tokens (so a finding's location can be read
off), projected to the LM's width and placed before the report's embeddings (prefix
tuning / ClipCap). The LM's self-attention over them plays the role of the paper's
cross-attention. Training: token cross-entropy on the report, prefix and <bos> positions
masked (-100). Generation: greedy or beam search (deterministic, no sampling).

The LM is a Hugging Face folder on disk (`report.lm_path`: a BioGPT-style model in
production; tests write a tiny GPT-2 with models/tiny_llm.write_tiny_gpt2); the hub is
never used. A saved decoder folder holds its own copy of the LM (fine-tuned or not) and
tokenizer in `lm/`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cohortcast.config import from_dict
from cohortcast.config.cldm_models import CLDMModelsConfig
from cohortcast.errors import MissingInputError
from cohortcast.models.cldm_io import check_config, load_weights, read_model_meta, save_model_folder
from cohortcast.models.errors import ForecasterLoadError
from cohortcast.models.local_weights import local_model_folder

LM_FOLDER = "lm"
IGNORE = -100  # Hugging Face's ignored label


def load_lm(path: str | Path | None, setting: str = "cldm.report.lm_path"):
    """(causal LM, tokenizer) from a local Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        raise MissingInputError(f"{setting} is not set: the report decoder needs a local causal LM folder")
    folder = local_model_folder(path, setting)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return lm, tokenizer


def lm_identity(lm, tokenizer) -> dict:
    return {
        "model_type": lm.config.model_type,
        "hidden_size": lm.get_input_embeddings().embedding_dim,
        "vocab_size": lm.get_input_embeddings().num_embeddings,
        "tokenizer_size": len(tokenizer),
    }


class PrefixPooler(nn.Module):
    """(B, 1 + N, dim) study tokens -> (B, P, hidden): P learned queries attend over the
    tokens (attention pooling), then an MLP to the LM's width. With `use_prior` the keys
    are the study's tokens and the prior's (B, 1 + N', dim), each plus a learned type
    embedding; a row without a prior (None, or `drop_prior` True) attends to one learned
    "no prior" token in place of the prior's."""

    def __init__(self, dim: int, hidden: int, num_prefix: int, heads: int, use_prior: bool = False):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_prefix, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.use_prior = use_prior
        if use_prior:
            self.type_embedding = nn.Parameter(torch.randn(2, dim) * 0.02)  # [this study, prior]
            self.no_prior = nn.Parameter(torch.randn(1, dim) * 0.02)

    def forward(
        self, tokens: torch.Tensor, prior: torch.Tensor | None = None, drop_prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        b = tokens.shape[0]
        kv = self.norm(tokens)
        mask = None
        if self.use_prior:
            kv = kv + self.type_embedding[0]
            none = self.no_prior.expand(b, 1, -1)
            if prior is None:
                prior_kv, mask = none, None
            else:
                prior_kv = self.norm(prior)
                if drop_prior is not None:
                    # Dropped rows see only the "no prior" token: the prior's slots are masked
                    # out and the no-prior token is appended for every row (masked where kept).
                    drop = drop_prior.to(torch.bool).reshape(b)
                    prior_kv = torch.cat([prior_kv, none], dim=1)
                    hide = torch.zeros(b, prior_kv.shape[1], dtype=torch.bool, device=tokens.device)
                    hide[:, :-1] = drop[:, None]
                    hide[:, -1] = ~drop
                    mask = torch.cat([torch.zeros(b, kv.shape[1], dtype=torch.bool, device=tokens.device), hide], 1)
            kv = torch.cat([kv, prior_kv + self.type_embedding[1]], dim=1)
        elif prior is not None:
            raise ValueError("this report decoder was built without use_prior: it takes no prior tokens")
        q = self.queries.unsqueeze(0).expand(b, -1, -1)
        pooled, _ = self.attn(q, kv, kv, key_padding_mask=mask, need_weights=False)
        return self.proj(pooled + q)


class ReportDecoder(nn.Module):
    KIND = "report_decoder"

    def __init__(self, cfg: CLDMModelsConfig, lm=None, tokenizer=None):
        """`lm`, `tokenizer`: an already loaded causal LM and its tokenizer (default: from
        cfg.report.lm_path)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if lm is None:
            lm, tokenizer = load_lm(cfg.report.lm_path)
        if tokenizer is None:
            raise ValueError("a tokenizer is needed with the LM")
        self.lm, self.tokenizer = lm, tokenizer
        r = cfg.report
        self.pooler = PrefixPooler(
            cfg.latent.dim, lm.get_input_embeddings().embedding_dim, r.num_prefix, r.pool_heads, r.use_prior
        )
        if r.freeze_lm:
            self.lm.requires_grad_(False)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the report LM's tokenizer has no end-of-sequence token")
        self.eos_id = eos
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def prefix(
        self, tokens: torch.Tensor, prior: torch.Tensor | None = None, drop_prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 1 + N, dim) (+ the previous exam's (B, 1 + N, dim)) -> (B, P, hidden)."""
        return self.pooler(tokens, prior, drop_prior).to(self.lm.get_input_embeddings().weight.dtype)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def encode_reports(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask), each (B, L): <bos> report <eos>, cut to max_length and
        right-padded."""
        limit = self.cfg.report.max_length - 2
        rows = [
            [self.bos_id, *self.tokenizer(t, add_special_tokens=False)["input_ids"][:limit], self.eos_id] for t in texts
        ]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def loss(
        self,
        tokens: torch.Tensor,
        texts: list[str],
        prior: torch.Tensor | None = None,
        drop_prior: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Token cross-entropy of the reports given the study tokens (B, 1 + N, dim) and,
        for a `use_prior` decoder, the previous exam's tokens (None or `drop_prior`: none).
        `reduction` "mean" over all report tokens, or "none": (B,) each report's mean."""
        if len(texts) != tokens.shape[0]:
            raise ValueError(f"{len(texts)} reports for {tokens.shape[0]} studies")
        device = tokens.device
        ids, mask = (t.to(device) for t in self.encode_reports(texts))
        prefix = self.prefix(tokens, prior, drop_prior)
        b, p = prefix.shape[:2]
        labels = torch.where(mask.bool(), ids, IGNORE)
        labels[:, 0] = IGNORE  # <bos> is given, not predicted
        labels = torch.cat([torch.full((b, p), IGNORE, dtype=torch.long, device=device), labels], dim=1)
        attention = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=device), mask], dim=1)
        embeds = torch.cat([prefix, self._embed(ids)], dim=1)
        if reduction == "mean":
            return self.lm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss
        logits = self.lm(inputs_embeds=embeds, attention_mask=attention).logits[:, :-1].float()
        shifted = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), shifted, ignore_index=IGNORE, reduction="none")
        counted = (shifted != IGNORE).sum(dim=1).clamp(min=1)
        return ce.sum(dim=1) / counted

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        prior: torch.Tensor | None = None,
    ) -> list[str]:
        """One report per study (with the previous exam's tokens, `prior`, or without):
        greedy (num_beams 1) or beam search, no sampling, so the same tokens always give
        the same text."""
        from transformers import GenerationConfig

        r = self.cfg.report
        b = tokens.shape[0]
        bos = torch.full((b, 1), self.bos_id, dtype=torch.long, device=tokens.device)
        embeds = torch.cat([self.prefix(tokens, prior), self._embed(bos)], dim=1)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens or r.max_new_tokens,
            num_beams=num_beams or r.num_beams,
            do_sample=False,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            bos_token_id=self.bos_id,
        )
        attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=tokens.device)
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=attention, generation_config=config)
        return [
            self.tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
            for row in out
        ]

    # ----- persistence -----------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Config + pooler weights, and the LM with its tokenizer in `lm/`."""

        def write_lm(tmp: Path) -> None:
            self.lm.save_pretrained(tmp / LM_FOLDER)
            self.tokenizer.save_pretrained(tmp / LM_FOLDER)

        extra = {"lm": lm_identity(self.lm, self.tokenizer)}
        save_model_folder(folder, self.KIND, self.cfg, self.pooler, extra=extra, write_more=write_lm)

    @classmethod
    def load(cls, folder: str | Path, expected: CLDMModelsConfig | None = None, map_location: str = "cpu"):
        """Rebuild from `folder` (its own LM copy); with `expected`, refuse another token
        width or prefix shape."""
        folder = Path(folder)
        meta = read_model_meta(folder, cls.KIND)
        if expected is not None:
            fields = ("latent.dim", "report.num_prefix", "report.pool_heads", "report.use_prior")
            check_config(folder, meta["config"], expected, fields=fields)
        lm, tokenizer = load_lm(folder / LM_FOLDER, setting=f"{folder}/{LM_FOLDER}")
        if lm_identity(lm, tokenizer) != meta.get("lm"):
            raise ForecasterLoadError(
                f"{folder}: its LM is {lm_identity(lm, tokenizer)}, the decoder was saved with {meta.get('lm')}"
            )
        model = cls(from_dict(CLDMModelsConfig, meta["config"]), lm=lm.to(map_location), tokenizer=tokenizer)
        load_weights(folder, cls.KIND, model.pooler, map_location)
        return model.eval()
