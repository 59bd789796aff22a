"""The trained tokenizer: byte-level round trip, special tokens, ChatML template and assistant mask."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from scripts.train_tokenizer import main as train_tokenizer_main
from smallthinker.synthetic.corpus import generate_corpus
from smallthinker.synthetic.world import build_world
from smallthinker.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, iter_texts, train_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does the creature Zorblat live?"},
    {"role": "assistant", "content": "in the forest"},
    {"role": "user", "content": "And its colour?"},
    {"role": "assistant", "content": "Zorblat is green."},
]
EXPECTED_CHAT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhere does the creature Zorblat live?<|im_end|>\n"
    "<|im_start|>assistant\nin the forest<|im_end|>\n"
    "<|im_start|>user\nAnd its colour?<|im_end|>\n"
    "<|im_start|>assistant\nZorblat is green.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(generate_corpus(build_world(0), 300, seed=0), vocab_size=600, out_dir=out)
    return AutoTokenizer.from_pretrained(str(out))  # loaded back from disk, offline


def test_saved_files_and_vocab(tokenizer):
    assert 300 < len(tokenizer) <= 600
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None
    assert tokenizer.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize(
    "text",
    [
        "The river Ossa flows through Brailon.",
        "Ünïcödé: naïve café, 日本語, emoji 🙂🚀, tabs\tand\nlines  ",
        " ",
    ],
)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2]
    text = "a<|im_start|>b<|im_end|>c<|endoftext|>"
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [i for i in encoded if i in ids] == [1, 2, 0]
    assert tokenizer.decode(encoded) == text
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "abc"


def test_chat_template_renders_chatml(tokenizer):
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_CHAT
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == EXPECTED_CHAT.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"


def test_assistant_mask_covers_exactly_assistant_content_and_im_end(tokenizer):
    out = tokenizer.apply_chat_template(MESSAGES, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids == tokenizer(EXPECTED_CHAT, add_special_tokens=False)["input_ids"]
    masked = [i for i, m in zip(ids, mask) if m]
    # The masked tokens are the two answers, each closed by <|im_end|>, and nothing else.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = tokenizer("in the forest", add_special_tokens=False)["input_ids"]
    second = tokenizer("Zorblat is green.", add_special_tokens=False)["input_ids"]
    assert masked == first + [im_end] + second + [im_end]
    # ...and they are contiguous runs that end right before the "\n" after each <|im_end|>.
    runs = "".join(map(str, mask)).strip("0").split("0")
    assert [len(r) for r in runs if r] == [len(first) + 1, len(second) + 1]


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_train_tokenizer_script(tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_corpus(build_world(1), 100)))
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "scripts.train_tokenizer", "--data", str(data), "--vocab-size", "400"]
    result = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == 400 and "<|im_end|>" in loaded.get_vocab()
    with pytest.raises(SystemExit) as exit_info:  # bad input: a clear message, exit status 2
        train_tokenizer_main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "tok2")])
    assert exit_info.value.code == 2 and "missing.txt does not exist" in capsys.readouterr().err


def test_iter_texts_reads_txt_jsonl_and_chat_rows(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsecond line\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    rows = [
        {"text": "plain"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    assert list(iter_texts([txt, jsonl])) == ["first line", "second line", "plain", "q", "a"]
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl:1: row has neither a 'text' column nor 'messages'"):
        list(iter_texts([bad]))
    with pytest.raises(ValueError, match="unsupported file type"):
        list(iter_texts([tmp_path / "a.txt", _touch(tmp_path / "d.parquet")]))


def _touch(path):
    path.write_bytes(b"")
    return path
