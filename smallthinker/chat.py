"""Chat with a model: ChatML prompts through the tokenizer's chat template, streamed replies, tokens/s.

`chat_once` is the library call (used by tests and the quickstart); `ChatSession` keeps the history of
a conversation; `chat_repl` is the interactive loop of `scripts/chat.py`.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import AutoTokenizer, TextStreamer

from smallthinker.inference import load_offloaded
from smallthinker.inference.formats import quantize_model
from smallthinker.inference.store import MANIFEST
from smallthinker.modeling import SmallThinkerForCausalLM
from smallthinker.tokenizer import CHATML_TEMPLATE

END_OF_TURN = "<|im_end|>"


@dataclass
class SamplingConfig:
    """Decoding settings; the defaults are SmallThinker's recommended sampling (temperature 0 = greedy)."""

    max_new_tokens: int = 256
    temperature: float = 0.6
    top_k: int = 20
    top_p: float = 0.95
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature <= 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
        }


@dataclass
class ChatReply:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    """Wall time of the whole reply (prefill + decode)."""
    first_token_seconds: float
    """Time to the first new token (prefill)."""
    token_ids: list[int] = field(default_factory=list)
    """The generated ids, end-of-turn token included."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens/s after the first token (the decode rate, prefill excluded)."""
        span = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / span if self.new_tokens > 1 and span > 0 else float("nan")

    def stats_line(self) -> str:
        # A one-token reply has no decode phase: its rate is not a number worth printing.
        decode = (
            f"decode {self.decode_tokens_per_s:.2f} tok/s, "
            if math.isfinite(self.decode_tokens_per_s)
            else ""
        )
        return (
            f"[{self.new_tokens} tokens in {self.seconds:.2f} s: {self.tokens_per_s:.2f} tok/s, "
            f"{decode}prompt {self.prompt_tokens} tokens, first token {self.first_token_seconds:.2f} s]"
        )


class TimedStreamer(TextStreamer):
    """TextStreamer that records when the first new token arrives; prints to `out` (None: silent)."""

    def __init__(self, tokenizer: Any, out: TextIO | None = sys.stdout):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.first_token_time: float | None = None
        self.printed_any = False

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt and self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.printed_any:
            # Replies may start with a space (a word's in-sentence token); the terminal shows them flush left.
            text = text.lstrip(" ")
            self.printed_any = bool(text)
        if self.out is not None:
            self.out.write(text + ("\n" if stream_end else ""))
            self.out.flush()


def end_of_turn_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end a reply: the tokenizer's EOS, `<|im_end|>` and the model's generation EOS ids."""
    ids: list[int] = []
    candidates = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    for i in candidates:
        if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    if not ids:
        raise ValueError("The tokenizer has no EOS or <|im_end|> token: replies would never end.")
    return ids


def chat_once(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    sampling: SamplingConfig | None = None,
    *,
    stream_to: TextIO | None = None,
) -> ChatReply:
    """Generate the assistant's reply to `messages` (ChatML via the tokenizer's chat template).

    With `stream_to` the reply is printed token by token as it is generated.
    """
    sampling = sampling or SamplingConfig()
    if tokenizer.chat_template is None:
        raise ValueError("The tokenizer has no chat_template: cannot format the conversation.")
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    stop_ids = end_of_turn_ids(tokenizer, model)
    streamer = TimedStreamer(tokenizer, stream_to)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **enc,
            **sampling.generate_kwargs(),
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0],
            streamer=streamer,
        )
    seconds = time.perf_counter() - start
    prompt_len = enc["input_ids"].shape[1]
    new_BN = out[:, prompt_len:]
    new = new_BN[0].tolist()
    first = (streamer.first_token_time or start + seconds) - start
    text_ids = new[:-1] if new and new[-1] in stop_ids else new
    text = tokenizer.decode(text_ids, skip_special_tokens=True)
    return ChatReply(text, prompt_len, len(new), seconds, first, new)


@dataclass
class ChatSession:
    """A conversation with history: `ask` appends the user turn and the reply; `reset` forgets them."""

    model: Any
    tokenizer: Any
    system: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, stream_to: TextIO | None = None) -> ChatReply:
        self.messages.append({"role": "user", "content": text})
        reply = chat_once(self.model, self.tokenizer, self.messages, self.sampling, stream_to=stream_to)
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply


HELP = "Type a message. /reset forgets the conversation, /exit (or Ctrl-D) quits."


def chat_repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Interactive loop: replies stream to `out`, followed by their tokens/s."""
    out.write(HELP + "\n")
    while True:
        try:
            line = read(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if not line:
            continue
        reply = session.ask(line, stream_to=out)
        out.write(reply.stats_line() + "\n")
        out.flush()


def load_chat_model(
    path: str | Path,
    *,
    offload: bool = False,
    memory_budget: str = "1GB",
    dtype: str | None = None,
    max_context: int = 4096,
    overhead: str = "128MiB",
    weight_format: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a checkpoint directory, or from an expert store with `offload=True`;
    `weight_format` ("bf16", "int8", "int4") converts experts, attention and LM head (`formats.quantize_model`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: give a checkpoint directory.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"No tokenizer in {path} ({e}): save one next to the checkpoint.") from e
    if tokenizer.chat_template is None:
        warnings.warn(f"{path} has no chat template; using ChatML.", stacklevel=2)
        tokenizer.chat_template = CHATML_TEMPLATE
    if offload:
        return _load_offloaded(path, memory_budget, max_context, overhead, weight_format), tokenizer
    torch_dtype = getattr(torch, dtype) if dtype else "auto"
    # Our class, not the Auto one: it also reads the published 21B config.json, which has no model_type.
    model = SmallThinkerForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if weight_format is not None:
        model = quantize_model(model, weight_format)
    return model.eval(), tokenizer


def _load_offloaded(
    path: Path, memory_budget: str, max_context: int, overhead: str, weight_format: str | None = None
) -> Any:
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{path} is not an expert store (no {MANIFEST}): convert the checkpoint first with "
            f"smallthinker convert-store --src CHECKPOINT --dst {path}"
        )
    return load_offloaded(
        path,
        memory_budget=memory_budget,
        max_context=max_context,
        overhead=overhead,
        weight_format=weight_format,
    )
