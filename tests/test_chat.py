"""Chat helpers on a real tiny saved model: greedy parity, end of turn, history, REPL, CLI, offload."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smallthinker.chat import (
    ChatSession,
    SamplingConfig,
    chat_once,
    chat_repl,
    end_of_turn_ids,
    load_chat_model,
)
from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from tests.train.fixtures_data import chat_tokenizer

REPO = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "what is two plus two?"}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tinychat")
    tok = chat_tokenizer()
    torch.manual_seed(0)
    cfg = load_model_config(
        "tiny-4b-style",
        num_hidden_layers=2,
        vocab_size=len(tok),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    SmallThinkerForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(saved):
    return load_chat_model(saved)


def greedy_reference(model, tokenizer, messages, n: int) -> tuple[list[int], int]:
    """Plain argmax loop over full forwards (no cache, no generate): the spec for greedy chat."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    prompt_len, ids = len(ids), list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
                break
    return ids[prompt_len:], prompt_len


def test_greedy_reply_matches_reference_loop(loaded):
    model, tok = loaded
    reply = chat_once(model, tok, QUESTION, SamplingConfig(max_new_tokens=6, temperature=0))
    expected, prompt_len = greedy_reference(model, tok, QUESTION, 6)
    assert reply.token_ids == expected
    assert reply.prompt_tokens == prompt_len and reply.new_tokens == len(expected)
    assert reply.text == tok.decode(expected, skip_special_tokens=True)
    assert reply.seconds > 0 and reply.tokens_per_s > 0 and "tok/s" in reply.stats_line()


def test_reply_stops_at_end_of_turn(saved):
    model, tok = load_chat_model(saved)
    assert {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} <= set(end_of_turn_ids(tok, model))
    with torch.no_grad():  # all logits 0: greedy picks id 0, <|endoftext|>, which ends the reply at once
        model.lm_head.weight.zero_()
    reply = chat_once(model, tok, QUESTION, SamplingConfig(max_new_tokens=10, temperature=0))
    assert reply.token_ids == [tok.eos_token_id] == [0]
    assert reply.text == "" and reply.new_tokens == 1


def test_session_keeps_history_and_repl_resets(loaded):
    model, tok = loaded
    sampling = SamplingConfig(max_new_tokens=3, temperature=0)
    session = ChatSession(model, tok, system="you are a helpful assistant.", sampling=sampling)
    first = session.ask("hello!")
    second = session.ask("what is two plus two?")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first.text
    # the second prompt holds the first exchange
    assert second.prompt_tokens > first.prompt_tokens + first.new_tokens

    snapshots = []
    script = iter(["hello!", "/reset", "", "hi", "/exit", "never read"])

    def read(prompt: str) -> str:
        snapshots.append([m["role"] for m in session.messages])
        return next(script)

    out = io.StringIO()
    chat_repl(session, read=read, out=out)
    assert snapshots == [
        ["system", "user", "assistant", "user", "assistant"],
        ["system", "user", "assistant", "user", "assistant", "user", "assistant"],  # history kept
        ["system"],  # after /reset
        ["system"],  # an empty line is ignored
        ["system", "user", "assistant"],  # only the turn after the reset
    ]
    assert out.getvalue().count(" tokens in ") == 2 and "(conversation reset)" in out.getvalue()


def test_cli_one_shot_prints_reply_and_tokens_per_s(saved, loaded):
    model, tok = loaded
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=0)
    expected = chat_once(model, tok, QUESTION, sampling).text
    cmd = [sys.executable, "-m", "scripts.chat", "--model", str(saved), "--prompt", QUESTION[0]["content"]]
    cmd += ["--max-new-tokens", "8", "--temperature", "1.0", "--seed", "0"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert expected.strip() and expected in run.stdout
    assert re.search(r"\d+ tokens in [\d.]+ s: [\d.]+ tok/s", run.stdout)


def test_offloaded_model_gives_the_same_greedy_reply(saved, loaded, tmp_path):
    store_mod = pytest.importorskip("smallthinker.inference.store")
    model, tok = loaded
    store = store_mod.convert_checkpoint(saved, tmp_path / "store")
    offloaded, tok2 = load_chat_model(store, offload=True, memory_budget="200MB")
    sampling = SamplingConfig(max_new_tokens=5, temperature=0)
    assert (
        chat_once(offloaded, tok2, QUESTION, sampling).token_ids
        == chat_once(model, tok, QUESTION, sampling).token_ids
    )


def test_clear_errors(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_chat_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an expert store"):
        load_chat_model(saved, offload=True)


def test_a_one_token_reply_reports_no_decode_rate():
    """A reply of one token has no decode phase: its stats line leaves the rate out instead of printing nan."""
    from smallthinker.chat import ChatReply

    one = ChatReply("x", prompt_tokens=5, new_tokens=1, seconds=0.5, first_token_seconds=0.5, token_ids=[7])
    assert one.stats_line() == "[1 tokens in 0.50 s: 2.00 tok/s, prompt 5 tokens, first token 0.50 s]"
    two = ChatReply(
        "xy", prompt_tokens=5, new_tokens=3, seconds=1.0, first_token_seconds=0.5, token_ids=[7, 8, 9]
    )
    assert "decode 4.00 tok/s" in two.stats_line()


def test_cli_weight_format_switch(saved):
    """`--weight-format int4` chats with the quantised model: the reply is the resident int4 model's."""
    from smallthinker.inference.formats import quantize_model

    model, tok = load_chat_model(saved)
    int4 = quantize_model(model, "int4")
    expected = chat_once(int4, tok, QUESTION, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=0)).text
    cmd = [sys.executable, "-m", "smallthinker", "chat", "--model", str(saved), "--prompt", QUESTION[0]["content"],
           "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "0", "--weight-format", "int4"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert expected.strip() and expected in run.stdout
