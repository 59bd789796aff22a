"""Real, tiny inputs for the training-loop tests: a word-level tokenizer saved to disk, jsonl corpora
with learnable structure, and a `TrainConfig` for a 2-layer model that trains in seconds on CPU."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from smallthinker.train.config import TrainConfig, load_train_config

N_WORDS = 60


def save_word_tokenizer(path: Path, eos: str | None = "<eos>") -> Path:
    """'<eos>'=0, '<pad>'=1, '<unk>'=2, 'w{i}'=i+3."""
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(N_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)
    return path


def write_corpus(path: Path, n_docs: int = 400) -> Path:
    """Arithmetic progressions mod N_WORDS: after two tokens the rest of a document is predictable."""
    rows = []
    for d in range(n_docs):
        start, stride, length = d % N_WORDS, 1 + d % 5, 6 + d % 11
        words = [f"w{(start + i * stride) % N_WORDS}" for i in range(length)]
        rows.append({"text": " ".join(words)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(tmp: Path, *overrides: str) -> TrainConfig:
    """A 2-layer, 4-expert model on the progression corpus, fp32, no progress bar, no TensorBoard."""
    tokenizer = tmp / "tokenizer"
    if not tokenizer.exists():
        save_word_tokenizer(tokenizer)
    corpus = tmp / "corpus" / "train.jsonl"
    if not corpus.exists():
        write_corpus(corpus)
    base = [
        f"run_dir={tmp / 'run'}",
        f"tokenizer.path={tokenizer}",
        f"data={{sources: [{{path: '{corpus}'}}], seq_len: 32, seed: 0}}",
        "model.preset=tiny-4b-style",
        "model.overrides={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
        "num_key_value_heads: 1, head_dim: 16, moe_num_primary_experts: 4, "
        "moe_num_active_primary_experts: 2, moe_ffn_hidden_size: 32}",
        "model.experts_implementation=eager",
        "micro_batch_size=2",
        "grad_accum_steps=2",
        "max_steps=6",
        "optim.lr=3e-3",
        "schedule.warmup_steps=2",
        "checkpoint.every=0",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        "logging.moe_metrics_every=2",
        "logging.neuron_sparsity_every=3",
    ]
    return load_train_config(None, base + list(overrides))
