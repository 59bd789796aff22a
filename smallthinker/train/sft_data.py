"""SFT data: chat conversations formatted with the tokenizer's chat template, loss on assistant tokens only.

Each conversation becomes (input_ids, labels) with labels = -100 outside the assistant replies. Label
masks come from `apply_chat_template(return_assistant_tokens_mask=True)` when the template marks the
replies with `{% generation %}` blocks; otherwise from the ChatML markers: every token overlapping
`<|im_start|>assistant\\n` ... `<|im_end|>` (reply text and its closing `<|im_end|>`, as the generation
blocks of our ChatML template do).

Packing: whole conversations go into a row while they fit; the rest of the row is padding (labels
-100). Position ids restart at 0 for each conversation, so with `use_cache=False` (or the masks of
`data.document_attention_masks`) packed conversations do not attend to each other. A conversation
longer than `seq_len` is truncated or dropped (`truncation`), with a warning.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset

from smallthinker.train.data import (
    STATE_VERSION,
    TOKEN_MASK,
    Cursor,
    TrainStream,
    check_fields,
    looks_local,
    open_cursors,
    pick_source,
    positions_from_starts,
    to_batch,
)

ROLES = ("system", "user", "assistant", "tool")
# A ChatML assistant reply: its text and the closing marker (group 1).
CHATML_ASSISTANT = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
# Give up when this many conversations in a row yield no trainable token (instead of looping forever).
MAX_CONSECUTIVE_SKIPS = 1000


@dataclass
class SFTSourceConfig:
    """One chat dataset: a `messages` column, or prompt/response columns."""

    path: str
    name: str | None = None
    split: str = "train"
    messages_field: str = "messages"
    """Column with a list of {role, content} messages (used unless `prompt_field` is set)."""
    prompt_field: str | None = None
    """Set to read single-turn prompt/response columns instead of `messages_field`."""
    response_field: str = "response"
    system_field: str | None = None
    """Optional column with a per-example system prompt (prompt/response format)."""
    weight: float = 1.0
    id: str | None = None

    @property
    def key(self) -> str:
        if self.id:
            return self.id
        return Path(self.path).stem if looks_local(self.path) else self.path

    def fields(self) -> list[str]:
        if self.prompt_field is None:
            return [self.messages_field]
        return [self.prompt_field, self.response_field] + ([self.system_field] if self.system_field else [])


@dataclass
class SFTDataConfig:
    """SFT data: sources, formatting, packing and truncation."""

    sources: list[SFTSourceConfig]
    seq_len: int = 2048
    pack: bool = True
    """Several conversations per row (False: one conversation per row, padded)."""
    truncation: str = "truncate"
    """Conversations longer than seq_len: "truncate" (keep the first seq_len tokens) or "drop"."""
    system_prompt: str | None = None
    """System message prepended to conversations that have none."""
    label_mask: str = "auto"
    """"generation" (template blocks), "chatml" (markers) or "auto" (generation blocks if the template has them)."""
    streaming: bool = False
    seed: int = 0
    num_proc: int | None = None

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SFTSourceConfig) else SFTSourceConfig(**s) for s in self.sources]
        if not self.sources:
            raise ValueError("SFTDataConfig.sources is empty: give at least one {path: ...}.")
        keys = [s.key for s in self.sources]
        if len(set(keys)) != len(keys):
            raise ValueError(f"SFT source keys must be unique, got {keys}: set `id` on the sources.")
        if self.truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {self.truncation!r}.")
        if self.label_mask not in ("auto", "generation", "chatml"):
            raise ValueError(f"label_mask must be 'auto', 'generation' or 'chatml', got {self.label_mask!r}.")
        if any(s.weight < 0 for s in self.sources) or sum(s.weight for s in self.sources) <= 0:
            raise ValueError("SFT source weights must be >= 0 with a positive sum.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SFTDataConfig:
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# One conversation -> (input_ids, labels)
# --------------------------------------------------------------------------------------------------
def to_messages(example: dict[str, Any], src: SFTSourceConfig, system_prompt: str | None) -> list[dict]:
    """The example as a validated list of {role, content} messages."""
    if src.prompt_field is not None:
        messages = [
            {"role": "user", "content": example[src.prompt_field]},
            {"role": "assistant", "content": example[src.response_field]},
        ]
        if src.system_field and example.get(src.system_field):
            messages.insert(0, {"role": "system", "content": example[src.system_field]})
    else:
        messages = example[src.messages_field]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"Source {src.path}: '{src.messages_field}' must be a non-empty list of messages.")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"Source {src.path}: bad message {m!r}; need role in {ROLES} and string content."
            )
        clean.append({"role": m["role"], "content": m["content"]})
    if system_prompt is not None and clean[0]["role"] != "system":
        clean.insert(0, {"role": "system", "content": system_prompt})
    return clean


def has_generation_blocks(tokenizer: Any) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and GENERATION_BLOCK.search(template) is not None


def assistant_mask_from_markers(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of rendered ChatML text; mask = 1 on tokens overlapping an assistant reply."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [m.span(1) for m in CHATML_ASSISTANT.finditer(text)]
    mask, span_idx = [0] * len(enc["input_ids"]), 0
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        while span_idx < len(spans) and start >= spans[span_idx][1]:
            span_idx += 1
        if span_idx == len(spans):
            break
        if end > spans[span_idx][0]:
            mask[i] = 1
    return list(enc["input_ids"]), mask


def encode_conversation(
    tokenizer: Any, messages: list[dict], label_mask: str = "auto"
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 except on assistant reply tokens."""
    if tokenizer.chat_template is None:
        raise ValueError("The tokenizer has no chat_template: set tokenizer.chat_template (ChatML) for SFT.")
    mode = label_mask
    if mode == "auto":
        mode = "generation" if has_generation_blocks(tokenizer) else "chatml"
    if mode == "generation":
        if not has_generation_blocks(tokenizer):
            raise ValueError(
                "label_mask='generation' needs {% generation %} blocks in the chat template; "
                "use label_mask='chatml' (or 'auto') for a template without them."
            )
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids, mask = assistant_mask_from_markers(tokenizer, text)
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


def tokenize_sft_source(
    ds: Dataset | IterableDataset, tokenizer: Any, src: SFTSourceConfig, cfg: SFTDataConfig
) -> Dataset | IterableDataset:
    check_fields(ds, src.fields(), src.path)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        n = len(next(iter(batch.values())))
        pairs = [
            encode_conversation(
                tokenizer,
                to_messages({k: v[i] for k, v in batch.items()}, src, cfg.system_prompt),
                cfg.label_mask,
            )
            for i in range(n)
        ]
        return {"input_ids": [p[0] for p in pairs], "labels": [p[1] for p in pairs]}

    kwargs: dict[str, Any] = {"batched": True, "batch_size": 256, "remove_columns": ds.column_names}
    if isinstance(ds, Dataset):
        kwargs.update(num_proc=cfg.num_proc, desc=f"chat template {src.key}")
    return ds.map(encode, **kwargs)


# --------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------
class PackedChatStream(TrainStream):
    """SFT stream: whole conversations packed into rows (never split across rows), padded at the end."""

    current_stage = "sft"

    def __init__(
        self,
        cfg: SFTDataConfig,
        cursors: dict[str, Cursor],
        pad_id: int,
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
    ):
        super().__init__(micro_batch_size, rank, world_size)
        self.cfg, self.cursors, self.pad_id = cfg, cursors, pad_id
        self.weights = {s.key: s.weight for s in cfg.sources}
        self.source_tokens: dict[str, int] = {k: 0 for k in cursors}
        self.pending: tuple[list[int], list[int]] | None = None  # read but did not fit in the last row
        self.truncated = self.dropped = 0

    def _read_conversation(self) -> tuple[list[int], list[int]]:
        """Next usable conversation, truncated to seq_len; skips those with no assistant token left."""
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            key = pick_source(self.source_tokens, self.weights)
            ids, labels = (list(x) for x in self.cursors[key].next())
            self.source_tokens[key] += len(ids)
            if len(ids) > self.cfg.seq_len:
                if self.cfg.truncation == "drop":
                    self._warn("dropped", len(ids))
                    continue
                ids, labels = ids[: self.cfg.seq_len], labels[: self.cfg.seq_len]
                self._warn("truncated", len(ids))
            if any(t != -100 for t in labels[1:]):  # label 0 is never predicted (shifted)
                return ids, labels
            self.dropped += 1
        raise ValueError(
            f"{MAX_CONSECUTIVE_SKIPS} conversations in a row have no assistant token within seq_len="
            f"{self.cfg.seq_len}: check the data's assistant turns, the chat template and seq_len."
        )

    def _warn(self, what: str, n: int) -> None:
        setattr(self, what, getattr(self, what) + 1)
        warnings.warn(
            f"SFT conversation of {n}+ tokens {what} at seq_len={self.cfg.seq_len} "
            f"({self.truncated} truncated, {self.dropped} dropped so far on rank {self.rank}).",
            stacklevel=3,
        )

    def _next_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One row [S]: conversations while they fit, then padding; position ids restart per conversation."""
        s = self.cfg.seq_len
        ids, labels, starts = [], [], []
        while True:
            conv = self.pending if self.pending is not None else self._read_conversation()
            self.pending = None
            if ids and (len(ids) + len(conv[0]) > s or not self.cfg.pack):
                self.pending = conv
                break
            ids += conv[0]
            labels += [-100] + conv[1][1:]  # a conversation is never predicted from the previous one
            starts += [True] + [False] * (len(conv[0]) - 1)
            if not self.cfg.pack or len(ids) == s:
                break
        n_pad = s - len(ids)
        ids += [self.pad_id] * n_pad
        labels += [-100] * n_pad
        starts += ([True] + [False] * (n_pad - 1)) if n_pad else []  # padding is a document of its own
        real = [True] * (s - n_pad) + [False] * n_pad
        return (
            np.asarray(ids, dtype=np.int64),
            np.asarray(labels, dtype=np.int64),
            np.asarray(starts),
            np.asarray(real),
        )

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = [self._next_row() for _ in range(self.micro_batch_size)]
        ids_BS, labels_BS, starts_BS, real_BS = (np.stack(parts) for parts in zip(*rows))
        batch = to_batch(ids_BS, labels_BS, positions_from_starts(starts_BS))
        # Which tokens are conversation rather than row padding. Not an attention mask (a 2-D mask would turn
        # off transformers' packed-sequence detection from the position ids): the trainer pops it and uses it to
        # keep padding out of the router losses and expert-load counts.
        batch[TOKEN_MASK] = torch.from_numpy(real_BS.astype(np.int64))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "sft",
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "batches_emitted": self.batches_emitted,
            "source_tokens": dict(self.source_tokens),
            "pending": None if self.pending is None else [list(self.pending[0]), list(self.pending[1])],
            "truncated": self.truncated,
            "dropped": self.dropped,
            "cursors": {k: c.state_dict() for k, c in self.cursors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, "sft")
        if set(state["cursors"]) != set(self.cursors):
            raise ValueError(
                f"Stream state has sources {sorted(state['cursors'])}, config has {sorted(self.cursors)}."
            )
        self.batches_emitted = int(state["batches_emitted"])
        self.source_tokens = {k: int(v) for k, v in state["source_tokens"].items()}
        pending = state["pending"]
        self.pending = None if pending is None else (list(pending[0]), list(pending[1]))
        self.truncated, self.dropped = int(state["truncated"]), int(state["dropped"])
        for k, c in self.cursors.items():
            c.load_state_dict(state["cursors"][k])


def pad_token_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(
            "The tokenizer has neither a pad nor an EOS token to pad SFT rows with: set pad_token."
        )
    return int(pad)


def build_sft_stream(
    cfg: SFTDataConfig, tokenizer: Any, *, micro_batch_size: int, rank: int = 0, world_size: int = 1
) -> PackedChatStream:
    """The SFT micro-batch stream of one rank (endless: epochs reshuffle; the loop decides the steps)."""
    pad_id = pad_token_id(tokenizer)
    cursors = open_cursors(
        cfg.sources,
        lambda ds, src: tokenize_sft_source(ds, tokenizer, src, cfg),
        streaming=cfg.streaming,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        columns=("input_ids", "labels"),
    )
    return PackedChatStream(
        cfg, cursors, pad_id, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size
    )
