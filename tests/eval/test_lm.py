"""The lm-eval model class: log-likelihoods match a hand computation; non-SmallThinker input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from transformers import LlamaConfig, LlamaForCausalLM

from smallthinker.eval import NotSmallThinkerError, SmallThinkerLM

PAIRS = [
    ("Which animal is number 3?", " the otter"),
    ("In anatomy (test 1), which animal", " is number 1? the heron"),
    ("Q", " A"),
]


def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-softmax over the continuation tokens, each predicted from everything before it."""
    ctx, cont = tokenizer(context)["input_ids"], tokenizer(continuation)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # [S, V]
    # Token at position p is predicted by the logits at p - 1.
    return sum(logprobs[len(ctx) + j - 1, tok].item() for j, tok in enumerate(cont))


def requests(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def test_registered_with_lm_eval():
    assert get_model("smallthinker") is SmallThinkerLM


def test_loglikelihood_matches_log_softmax_sum(tiny_model, tokenizer):
    lm = SmallThinkerLM(pretrained=tiny_model, tokenizer=tokenizer, batch_size=2)  # batches of 2, padded
    results = lm.loglikelihood(requests(PAIRS))
    for (context, continuation), (logprob, _is_greedy) in zip(PAIRS, results):
        expected = hand_loglikelihood(tiny_model, tokenizer, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert logprob < 0


def test_checkpoint_path_gives_the_same_loglikelihoods(checkpoint, tiny_model, tokenizer):
    lm = SmallThinkerLM(pretrained=str(checkpoint), batch_size=3, device="cpu", dtype="float32")
    assert type(lm.model).__name__ == "SmallThinkerForCausalLM"
    assert lm.get_model_info()["model_num_parameters"] == sum(p.numel() for p in tiny_model.parameters())
    got = [ll for ll, _ in lm.loglikelihood(requests(PAIRS))]
    expected = [hand_loglikelihood(tiny_model, tokenizer, c, x) for c, x in PAIRS]
    assert got == pytest.approx(expected, abs=1e-4)


def test_refuses_a_checkpoint_of_another_family(tmp_path):
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32).save_pretrained(
        tmp_path
    )
    with pytest.raises(NotSmallThinkerError, match="not a SmallThinker checkpoint.*model_type='llama'"):
        SmallThinkerLM(pretrained=str(tmp_path))


def test_refuses_a_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(NotSmallThinkerError, match="no config.json"):
        SmallThinkerLM(pretrained=str(tmp_path))


def test_accepts_a_config_without_model_type(checkpoint, tmp_path):
    # The published 21B config.json has no model_type; its architectures entry identifies it.
    values = json.loads((checkpoint / "config.json").read_text())
    values.pop("model_type")
    (tmp_path / "config.json").write_text(json.dumps(values))
    from smallthinker.eval.lm import check_smallthinker_checkpoint

    check_smallthinker_checkpoint(str(tmp_path))


def test_refuses_an_in_memory_model_of_another_family(tokenizer):
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    with pytest.raises(NotSmallThinkerError, match="model object LlamaForCausalLM"):
        SmallThinkerLM(pretrained=LlamaForCausalLM(config), tokenizer=tokenizer)
