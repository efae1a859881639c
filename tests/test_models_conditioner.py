"""Soft-prompt LLM conditioner on a tiny random Gemma 3 with an offline tokenizer."""

import pytest
import torch

from cohortcast.config.models import ConditionerConfig
from cohortcast.models.conditioner import SoftPromptConditioner
from cohortcast.models.ehr_prompt import render_ehr_prompt
from cohortcast.models.tiny_llm import write_tiny_gemma3

EHR = {"age": 70.0, "gender": "Male", "SCT_LONG_DIA": 9.0, "SCT_PERP_DIA": 7.0}
SHORT = "Solid nodule in the lingula."
LONG = "CLINICAL HISTORY: 64-year-old female. Emphysema: yes. Spiculated part-solid nodule in the right upper lobe."


@pytest.fixture(scope="module")
def conditioner(tmp_path_factory):
    folder = write_tiny_gemma3(
        tmp_path_factory.mktemp("llm") / "tiny-gemma3",
        [SHORT, LONG, "other words", render_ehr_prompt(EHR), render_ehr_prompt({**EHR, "age": 50.0})],
    )
    torch.manual_seed(0)
    return SoftPromptConditioner(ConditionerConfig(llm_path=str(folder), num_soft_prompts=4))


def test_only_soft_prompts_train(conditioner):
    trainable = [n for n, p in conditioner.named_parameters() if p.requires_grad]
    assert trainable == ["soft_prompts"]
    assert all(not p.requires_grad for p in conditioner.lm.parameters())
    conditioner.zero_grad()
    conditioner([SHORT, LONG]).pow(2).sum().backward()
    assert conditioner.soft_prompts.grad is not None and conditioner.soft_prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in conditioner.lm.parameters())


def _manual_pool(cond, text):
    """Independent reference: one unpadded sequence [soft prompts, tokens], last position."""
    ids = cond.tokenizer([text], return_tensors="pt")["input_ids"]
    emb = cond.lm.get_input_embeddings()(ids)
    inputs = torch.cat([cond.soft_prompts[None], emb], 1)
    return cond.lm(inputs_embeds=inputs).last_hidden_state[0, -1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooled_position_is_the_last_real_token_under_padding(conditioner, side):
    conditioner.tokenizer.padding_side = side
    with torch.no_grad():
        batch = conditioner([SHORT, LONG])
        for k, text in enumerate((SHORT, LONG)):
            torch.testing.assert_close(batch[k], conditioner([text])[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batch[k], _manual_pool(conditioner, text), rtol=1e-5, atol=1e-5)
    assert batch.shape == (2, conditioner.hidden_size)


def test_last_token_matters(conditioner):
    with torch.no_grad():
        a, b = conditioner([SHORT]), conditioner([SHORT.replace("lingula", "nodule")])
    assert not torch.allclose(a, b)


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SoftPromptConditioner(ConditionerConfig(llm_path=str(tmp_path)))


def test_ehr_prompts_batch(conditioner):
    with torch.no_grad():
        out = conditioner([render_ehr_prompt(EHR), render_ehr_prompt({**EHR, "age": 50.0})])
    assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1])


def test_records_are_read_as_their_rendered_prompt(conditioner):
    """Guards SoftPromptConditioner.encode_records (the Forecaster now passes EHR records,
    not texts): a record reads exactly as its NAMD report prompt."""
    older = {**EHR, "age": 50.0}
    with torch.no_grad():
        by_record = conditioner.encode_records([EHR, older])
        by_text = conditioner([render_ehr_prompt(EHR), render_ehr_prompt(older)])
    torch.testing.assert_close(by_record, by_text)
    assert not torch.allclose(by_record[0], by_record[1])
