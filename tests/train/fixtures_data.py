"""Small real fixtures for the data tests: tokenizers trained in-process and jsonl corpora on disk."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from smallthinker.tokenizer import train_tokenizer


def word_tokenizer(n_words: int = 200, eos: str | None = "<eos>") -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: '<eos>'=0, '<pad>'=1, 'w{i}'=i+2, so token ids are predictable."""
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(n_words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<pad>", unk_token="<unk>")


def word_id(i: int) -> int:
    return i + 3


def chat_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The project's byte-level BPE (ChatML template with generation blocks), trained on a few sentences."""
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "what is two plus two? two plus two is four.",
        "you are a helpful assistant. hello! how can I help you today?",
        "system user assistant question answer the capital of france is paris",
    ] * 20
    tok = train_tokenizer(corpus, vocab_size=400)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


# Qwen2's ChatML without generation blocks: the label mask must then come from the markers.
PLAIN_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def word_docs(prefix: int, n_docs: int, min_len: int = 1, max_len: int = 9) -> list[list[int]]:
    """n_docs word-index lists; document d of source `prefix` starts with word prefix*? so docs are unique."""
    docs = []
    for d in range(n_docs):
        length = min_len + (d * 7 + prefix) % (max_len - min_len + 1)
        docs.append([(prefix * 50 + d + j) % 200 for j in range(length)])
    return docs


def docs_to_rows(docs: list[list[int]], field: str = "text") -> list[dict]:
    return [{field: " ".join(f"w{i}" for i in doc)} for doc in docs]
