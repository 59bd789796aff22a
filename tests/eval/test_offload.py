"""A model running through the CPU offload engine is evaluated by the same code as a resident one."""

from __future__ import annotations

import pytest

from smallthinker.eval import SmallThinkerLM, evaluate_suite
from smallthinker.inference.engine import load_offloaded
from smallthinker.inference.store import convert_checkpoint

from .test_lm import PAIRS, hand_loglikelihood, requests


@pytest.fixture(scope="module")
def offloaded(checkpoint, tmp_path_factory):
    store = convert_checkpoint(checkpoint, tmp_path_factory.mktemp("store") / "store")
    # Dense experts: the neuron-sparse path sums in another order (last-bit differences in fp32).
    model = load_offloaded(store, memory_budget="1GB", max_context=512, sparse=False)
    yield model
    model.offload_engine.close()


def test_offloaded_loglikelihoods_match_the_resident_model(offloaded, tiny_model, tokenizer):
    lm = SmallThinkerLM(pretrained=offloaded, tokenizer=tokenizer, batch_size=2)
    got = [ll for ll, _ in lm.loglikelihood(requests(PAIRS))]
    expected = [hand_loglikelihood(tiny_model, tokenizer, c, x) for c, x in PAIRS]
    assert got == pytest.approx(expected, abs=1e-4)
    assert offloaded.offload_engine.stats()["tokens"] > 0  # the experts really came through the engine


def test_offloaded_suite_run_equals_resident_run(offloaded, tiny_model, tokenizer, benchmark_dir, tmp_path):
    runs = {}
    for name, model in (("resident", tiny_model), ("offloaded", offloaded)):
        lm = SmallThinkerLM(pretrained=model, tokenizer=tokenizer)
        runs[name] = evaluate_suite(lm, "gpqa_diamond", tmp_path / name, data_dir=benchmark_dir, limit=4)
    assert runs["offloaded"]["headline"]["value"] == runs["resident"]["headline"]["value"]
    assert runs["offloaded"]["headline"]["n_samples"] == 4
