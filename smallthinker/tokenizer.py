"""Train a small byte-level BPE tokenizer shaped like SmallThinker's (Qwen2) one, with a ChatML template.

The official models use Qwen2's 151,936-token byte-level BPE; that vocabulary cannot be downloaded
here and would dwarf a tiny model anyway, so we train the same kind of tokenizer (same NFC
normaliser, same pre-tokenizer regex, byte-level alphabet so any text round-trips, same special
tokens and chat format) with a few thousand tokens on our own corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX): contractions, words
# with one leading non-letter, single digits, punctuation runs, newlines, other whitespace.
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# ChatML as Qwen2 / SmallThinker render it: `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
# The `{% generation %}` block marks the assistant content and its `<|im_end|>` (what the model must
# learn to produce), so `apply_chat_template(..., return_assistant_tokens_mask=True)` gives the SFT
# loss mask. Unlike Qwen2 no default system message is inserted: tiny models train on short samples.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _bpe_backend() -> Tokenizer:
    """An untrained byte-level BPE with Qwen2's normaliser, pre-tokenizer, decoder and post-processor."""
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps the leading space inside a token's character span, so the assistant
    # mask (computed from character spans) covers whole tokens.
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    return tokenizer


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train on `texts`; save with `save_pretrained(out_dir)` (loadable offline by AutoTokenizer).

    The 256 byte symbols and the 3 special tokens are always in the vocabulary, so `vocab_size`
    must exceed 259. Special tokens get ids 0-2 (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`).
    When `out_dir` is given the returned tokenizer is the one loaded back from disk.
    """
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs more than {minimum} "
                         "(256 bytes + 3 special tokens); 2048-4096 suits the tiny presets")  # fmt: skip
    backend = _bpe_backend()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,  # like Qwen2: no BOS, documents are separated by <|endoftext|>
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is None:
        return tokenizer
    tokenizer.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def iter_texts(paths: Iterable[str | Path], text_column: str = "text") -> Iterator[str]:
    """Texts of `.txt` files (one per line) and `.jsonl` files (`text_column`, or chat `messages` contents)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training data {path} does not exist")
        if path.suffix not in (".txt", ".jsonl", ".json"):
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; give .txt or .jsonl files")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if path.suffix == ".txt":
                    yield line.rstrip("\n")
                elif line.strip():
                    yield from _jsonl_texts(json.loads(line), text_column, f"{path}:{lineno}")


def _jsonl_texts(row: dict, text_column: str, where: str) -> Iterator[str]:
    if text_column in row:
        yield row[text_column]
    elif "messages" in row:
        yield from (m["content"] for m in row["messages"])
    else:
        raise ValueError(
            f"{where}: row has neither a {text_column!r} column nor 'messages' (keys: {sorted(row)})"
        )
