"""SFT data: exact assistant-only labels, chat template round trip, packing without cross-talk, resume."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from smallthinker.train.sft_data import SFTDataConfig, build_sft_stream, encode_conversation
from tests.train.fixtures_data import PLAIN_CHATML, chat_tokenizer, write_jsonl

CONVERSATION = [
    {"role": "system", "content": "you are a helpful assistant."},
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "two plus two is four."},
    {"role": "user", "content": "hello!"},
    {"role": "assistant", "content": "how can I help you today?"},
]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def segments(tok, messages) -> list[tuple[list[int], bool]]:
    """The ChatML rendering cut into (token ids, is_trained) pieces, tokenised piece by piece."""
    out = []
    for m in messages:
        out.append((tok.encode(f"<|im_start|>{m['role']}\n", add_special_tokens=False), False))
        trained = m["role"] == "assistant"
        out.append((tok.encode(m["content"] + "<|im_end|>", add_special_tokens=False), trained))
        out.append((tok.encode("\n", add_special_tokens=False), False))
    return out


@pytest.mark.parametrize("label_mask", ["generation", "chatml"])
def test_labels_are_exactly_the_assistant_replies(tok, label_mask):
    ids, labels = encode_conversation(tok, CONVERSATION, label_mask)
    expected_ids, expected_trained = [], []
    for piece, trained in segments(tok, CONVERSATION):
        expected_ids += piece
        expected_trained += [trained] * len(piece)
    assert ids == expected_ids
    trained_positions = [i for i, lab in enumerate(labels) if lab != -100]
    assert trained_positions == [i for i, t in enumerate(expected_trained) if t]
    assert all(labels[i] == ids[i] for i in trained_positions)
    # what is trained reads back as the two replies, each closed by <|im_end|>
    runs, cur = [], []
    for i, lab in enumerate(labels):
        if lab != -100:
            cur.append(ids[i])
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    assert runs == ["two plus two is four.<|im_end|>", "how can I help you today?<|im_end|>"]


def test_marker_fallback_matches_generation_blocks(tok):
    plain = chat_tokenizer(PLAIN_CHATML)
    assert encode_conversation(plain, CONVERSATION, "auto") == encode_conversation(
        tok, CONVERSATION, "generation"
    )


def test_chat_template_round_trip(tok):
    ids, _ = encode_conversation(tok, CONVERSATION)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ids) == text
    assert text.startswith("<|im_start|>system\nyou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def chats(n: int) -> list[dict]:
    words = ["two", "four", "hello", "paris", "fox", "dog", "the lazy dog", "quick brown fox"]
    return [
        {
            "messages": [
                {"role": "user", "content": f"question {words[i % 8]} {i}?"},
                {"role": "assistant", "content": " ".join(words[: 1 + i % 5]) + f" {i}."},
            ]
        }
        for i in range(n)
    ]


def conversations_in_row(ids_row: torch.Tensor, pos_row: torch.Tensor, labels_row: torch.Tensor):
    """Split a packed row at position resets; drop the padding tail (no labels)."""
    starts = [i for i in range(len(pos_row)) if pos_row[i] == 0] + [len(pos_row)]
    parts = [(ids_row[a:b].tolist(), labels_row[a:b].tolist()) for a, b in zip(starts, starts[1:])]
    return [p for p in parts if any(lab != -100 for lab in p[1])]


def test_packing_keeps_whole_conversations(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", chats(30))
    cfg = SFTDataConfig(sources=[{"path": str(path)}], seq_len=64)
    stream = build_sft_stream(cfg, tok, micro_batch_size=2)
    expected = {}
    for row in chats(30):
        ids, labels = encode_conversation(tok, row["messages"])
        expected[tuple(ids)] = labels
    seen = []
    for batch in [next(stream) for _ in range(6)]:
        assert batch["input_ids"].shape == (2, 64)
        for r in range(2):
            ids, pos, labels = batch["input_ids"][r], batch["position_ids"][r], batch["labels"][r]
            parts = conversations_in_row(ids, pos, labels)
            assert len(parts) >= 2  # ~25-token conversations: several per row
            for conv_ids, conv_labels in parts:
                assert tuple(conv_ids) in expected  # never split across rows
                assert conv_labels == [-100] + expected[tuple(conv_ids)][1:]
                seen.append(tuple(conv_ids))
            used = sum(len(p[0]) for p in parts)
            assert (ids[used:] == tok.pad_token_id).all() and (labels[used:] == -100).all()
    assert len(set(seen[:30])) == len(seen[:30])  # no conversation twice within an epoch


def test_prompt_response_columns_and_system_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "pr.jsonl", [{"q": "what is two plus two?", "a": "four."}])
    cfg = SFTDataConfig(
        sources=[{"path": str(path), "prompt_field": "q", "response_field": "a"}],
        seq_len=48,
        system_prompt="you are a helpful assistant.",
    )
    batch = next(build_sft_stream(cfg, tok, micro_batch_size=1))
    messages = [
        {"role": "system", "content": "you are a helpful assistant."},
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four."},
    ]
    ids, labels = encode_conversation(tok, messages)
    assert batch["input_ids"][0, : len(ids)].tolist() == ids
    assert batch["labels"][0, : len(ids)].tolist() == labels


def test_truncation_policy_warns(tmp_path, tok):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the quick brown fox " * 20}]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": long}])
    cfg = SFTDataConfig(sources=[{"path": str(path)}], seq_len=32)
    with pytest.warns(UserWarning, match="truncated at seq_len=32"):
        batch = next(build_sft_stream(cfg, tok, micro_batch_size=1))
    ids, _ = encode_conversation(tok, long)
    assert batch["input_ids"][0].tolist() == ids[:32]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "four."}]
    path2 = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": long}, {"messages": short}])
    cfg = SFTDataConfig(sources=[{"path": str(path2)}], seq_len=32, truncation="drop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [next(build_sft_stream(cfg, tok, micro_batch_size=4))]
    assert any("dropped" in str(w.message) for w in caught)
    short_ids, _ = encode_conversation(tok, short)
    assert batches[0]["input_ids"][0, : len(short_ids)].tolist() == short_ids  # only the short one is used


def test_resume_and_rank_sharding(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", chats(40))
    cfg = SFTDataConfig(sources=[{"path": str(path)}], seq_len=48, seed=5)
    ref = build_sft_stream(cfg, tok, micro_batch_size=2, rank=1, world_size=2)
    [next(ref) for _ in range(3)]
    state = json.loads(json.dumps(ref.state_dict()))
    expected = [next(ref) for _ in range(8)]  # wraps into the next epoch
    resumed = build_sft_stream(cfg, tok, micro_batch_size=2, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for e, g in zip(expected, [next(resumed) for _ in range(8)]):
        assert all(torch.equal(e[k], g[k]) for k in ("input_ids", "labels", "position_ids"))

    per_rank = []
    for rank in range(2):
        stream = build_sft_stream(cfg, tok, micro_batch_size=1, rank=rank, world_size=2)
        convs = []
        while len(convs) < 20:
            b = next(stream)
            convs += [
                tuple(c[0])
                for c in conversations_in_row(b["input_ids"][0], b["position_ids"][0], b["labels"][0])
            ]
        per_rank.append(set(convs[:20]))
    assert not per_rank[0] & per_rank[1] and len(per_rank[0] | per_rank[1]) == 40


def test_bad_sft_inputs(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"conversation": []}])
    with pytest.raises(ValueError, match="no field 'messages'"):
        build_sft_stream(SFTDataConfig(sources=[{"path": str(path)}]), tok, micro_batch_size=1)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(ValueError, match="bad message"):
        build_sft_stream(SFTDataConfig(sources=[{"path": str(bad)}]), tok, micro_batch_size=1)
    no_template = chat_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        encode_conversation(no_template, CONVERSATION)
    with pytest.raises(ValueError, match="needs {% generation %} blocks"):
        encode_conversation(chat_tokenizer(PLAIN_CHATML), CONVERSATION, "generation")
    no_reply = write_jsonl(
        tmp_path / "noreply.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3
    )
    with pytest.raises(ValueError, match="no assistant token"):
        next(build_sft_stream(SFTDataConfig(sources=[{"path": str(no_reply)}]), tok, micro_batch_size=1))
    with pytest.raises(ValueError, match="truncation"):
        SFTDataConfig(sources=[{"path": str(path)}], truncation="cut")


def test_packed_conversations_do_not_attend_to_each_other(tmp_path, tok):
    """Logits of a conversation packed after another == logits of it alone, on a real tiny model."""
    from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config

    torch.manual_seed(0)
    model = SmallThinkerForCausalLM(load_model_config("tiny-21b-style", vocab_size=len(tok))).eval()
    path = write_jsonl(tmp_path / "chat.jsonl", chats(10))
    batch = next(
        build_sft_stream(SFTDataConfig(sources=[{"path": str(path)}], seq_len=96), tok, micro_batch_size=1)
    )
    pos = batch["position_ids"]
    second_start = int((pos[0, 1:] == 0).nonzero()[0]) + 1
    second_end = second_start + int((pos[0, second_start + 1 :] == 0).nonzero()[0]) + 1
    second = batch["input_ids"][:, second_start:second_end]
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=pos, use_cache=False).logits[
            :, second_start:second_end
        ]
        alone = model(second, use_cache=False).logits
        token_mask = batch.pop("token_mask")
        loss_packed = model(**batch, use_cache=False).loss
    # The padding mask: conversations first, padding only at the end of a row, every trained label inside.
    assert bool((token_mask[:, 1:] <= token_mask[:, :-1]).all())
    assert bool((token_mask[batch["labels"] != -100] == 1).all())
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(loss_packed)
