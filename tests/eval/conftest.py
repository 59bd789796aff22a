"""Fixtures for the evaluation tests: a tiny random SmallThinker with a tokenizer trained here, and
small benchmark files in the public MMLU / GPQA schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, the format of the SmallThinker instruct models.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SUBJECTS = ("anatomy", "world_history")
ANIMALS = ("otter", "heron", "lynx", "marten", "ibis", "gecko", "tapir", "okapi")


def mmlu_rows(split: str, subject: str, n: int) -> list[dict]:
    """Distinct, well-formed MMLU rows; answers cycle through all four positions."""
    return [
        {
            "question": f"In {subject.replace('_', ' ')} ({split} {i}), which animal is number {i}?",
            "subject": subject,
            "choices": [f"the {ANIMALS[(i + k) % len(ANIMALS)]}" for k in range(4)],
            "answer": i % 4,
        }
        for i in range(n)
    ]


def gpqa_rows(n: int) -> list[dict]:
    return [
        {
            "Question": f"Which animal was seen on day {i}?",
            "Correct Answer": f"the {ANIMALS[i % len(ANIMALS)]}",
            "Incorrect Answer 1": f"the {ANIMALS[(i + 1) % len(ANIMALS)]}",
            "Incorrect Answer 2": f"the {ANIMALS[(i + 2) % len(ANIMALS)]}",
            "Incorrect Answer 3": f"the {ANIMALS[(i + 3) % len(ANIMALS)]}",
            "Record ID": f"rec{i:04d}",
            "High-level domain": "Biology",
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_benchmark_dir(root: Path, n_test: int = 3, n_dev: int = 5, n_gpqa: int = 6) -> Path:
    """root/mmlu/{dev,validation,test}.jsonl over SUBJECTS and root/gpqa/gpqa_diamond.jsonl."""
    for split, n in (("dev", n_dev), ("validation", 2), ("test", n_test)):
        write_jsonl(root / "mmlu" / f"{split}.jsonl", [r for s in SUBJECTS for r in mmlu_rows(split, s, n)])
    write_jsonl(root / "gpqa" / "gpqa_diamond.jsonl", gpqa_rows(n_gpqa))
    return root


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the fixture text, with the ChatML special tokens."""
    text = [r["question"] + " " + " ".join(r["choices"]) for s in SUBJECTS for r in mmlu_rows("test", s, 8)]
    text += [r["Question"] for r in gpqa_rows(8)] + [
        "The answer is (A) (B) (C) (D). Let's think step by step."
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer: PreTrainedTokenizerFast) -> SmallThinkerForCausalLM:
    torch.manual_seed(0)
    config = load_model_config(
        "tiny-4b-style",
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return SmallThinkerForCausalLM(config).eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-smallthinker"
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def benchmark_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_benchmark_dir(tmp_path_factory.mktemp("bench"))
