"""Pre-training data: load text sources with HF `datasets`, tokenise, mix, pack into fixed-length rows.

The stream is a pure function of (config, tokenizer, rank, world_size) plus a small state dict, so a
resumed run continues with exactly the batches it would have seen without the interruption.

Layout of one packed row (S tokens; documents separated by EOS, a document may run over into the
next row):

    input_ids     d0 d0 d0 EOS d1 d1 EOS d2 ...
    position_ids   0  1  2  3   0  1  2   0 ...   (reset at each document start when document_masking)
    labels        = input_ids, except the first token of every document after the first is -100 when
                    document_masking (it would be predicted from the previous document's EOS).

Document masking: with `position_ids` that restart at 0, transformers' `masking_utils` builds a
block-diagonal causal mask (per layer type, so sliding windows stay right) when the model is called
with `attention_mask=None` AND `use_cache=False` (with a cache, which the config's `use_cache=True`
creates by default, transformers skips the packed-sequence detection and documents see each other).
`document_attention_masks` builds the same masks explicitly, one [B, 1, S, S] boolean per layer
type, for callers that cannot rely on that.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

# File extension -> `datasets` builder name.
LOCAL_FORMATS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".csv": "csv",
}
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class SourceConfig:
    """One data source: a local file/directory or a hub dataset."""

    path: str
    """Local .json/.jsonl/.parquet/.txt/.csv file, a directory of such files, or a hub dataset name."""
    name: str | None = None
    """Hub dataset configuration name (the `name` argument of `datasets.load_dataset`)."""
    split: str = "train"
    text_field: str = "text"
    """Column holding the document text (`.txt` files always use `text`)."""
    weight: float = 1.0
    """Mixture weight (share of tokens) when the stage gives no weights of its own."""
    id: str | None = None
    """Key used in stage weights and logs; defaults to the file stem or the hub name."""

    @property
    def key(self) -> str:
        if self.id:
            return self.id
        return Path(self.path).stem if looks_local(self.path) else self.path


@dataclass
class StageConfig:
    """One curriculum stage: a global token budget and the mixture used while it lasts."""

    name: str
    tokens: int
    """Global token budget (all ranks together) of this stage."""
    weights: dict[str, float] = field(default_factory=dict)
    """Source key -> weight; empty means the sources' own weights. Weight 0 leaves a source out."""
    seq_len: int | None = None
    """Sequence length during this stage (defaults to `DataConfig.seq_len`)."""


@dataclass
class DataConfig:
    """Pre-training data: sources, curriculum and packing."""

    sources: list[SourceConfig]
    stages: list[StageConfig] = field(default_factory=list)
    """Empty: one endless stage with the sources' weights."""
    seq_len: int = 2048
    document_masking: bool = True
    """Reset position ids at document starts (no attention across documents) and mask cross-document labels."""
    streaming: bool = False
    """Read sources lazily (`datasets` streaming). Documents come in file order; resume stays exact."""
    seed: int = 0
    num_proc: int | None = None
    """Processes for tokenisation of map-style datasets."""
    tokenize_batch_size: int = 1000

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
        _validate(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _validate(cfg: DataConfig) -> None:
    if not cfg.sources:
        raise ValueError("DataConfig.sources is empty: give at least one {path: ..., text_field: ...}.")
    keys = [s.key for s in cfg.sources]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Data source keys must be unique, got {keys}: set `id` on the sources.")
    if cfg.seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {cfg.seq_len}.")
    for stage in cfg.stages:
        unknown = set(stage.weights) - set(keys)
        if unknown:
            raise ValueError(
                f"Stage '{stage.name}' weights name unknown sources {sorted(unknown)}; known: {keys}."
            )
        if stage.tokens <= 0:
            raise ValueError(f"Stage '{stage.name}' needs a positive token budget, got {stage.tokens}.")
    for weights in [stage_weights(cfg, i) for i in range(max(1, len(cfg.stages)))]:
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"Mixture weights must be >= 0 with a positive sum, got {weights}.")


def stage_weights(cfg: DataConfig, stage_idx: int) -> dict[str, float]:
    """Mixture weights in force during stage `stage_idx` (source key -> weight)."""
    own = {s.key: s.weight for s in cfg.sources}
    if cfg.stages and cfg.stages[stage_idx].weights:
        return {k: float(cfg.stages[stage_idx].weights.get(k, 0.0)) for k in own}
    return own


# --------------------------------------------------------------------------------------------------
# Loading and tokenisation
# --------------------------------------------------------------------------------------------------
def looks_local(path: str) -> bool:
    return os.path.exists(path) or path.startswith((".", "/", "~")) or Path(path).suffix in LOCAL_FORMATS


def _local_data_files(path: Path) -> tuple[str, list[str]]:
    """(builder, files) for a local file or a directory of files of one format."""
    if not path.exists():
        raise FileNotFoundError(f"Data source {path} does not exist.")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_dir():
        files = [p for p in files if p.suffix in LOCAL_FORMATS]
        if not files:
            raise FileNotFoundError(f"No data files ({', '.join(LOCAL_FORMATS)}) found under {path}.")
    builders = {LOCAL_FORMATS.get(p.suffix) for p in files}
    if None in builders:
        raise ValueError(
            f"Unknown source format '{path.suffix}' for {path}: use one of {', '.join(LOCAL_FORMATS)} "
            "or a hub dataset name."
        )
    if len(builders) > 1:
        raise ValueError(f"Directory {path} mixes formats {sorted(builders)}: give one source per format.")
    return builders.pop(), [str(p) for p in files]


def load_raw_source(
    path: str, name: str | None = None, split: str = "train", streaming: bool = False
) -> Dataset | IterableDataset:
    """Load a local file/directory or a hub dataset with `datasets.load_dataset`."""
    if looks_local(path):
        builder, files = _local_data_files(Path(path).expanduser())
        if all(os.path.getsize(f) == 0 for f in files):
            raise ValueError(f"Data source {path} is empty.")
        try:
            return load_dataset(builder, data_files=files, split=split, streaming=streaming)
        except Exception as e:  # noqa: BLE001 - re-raised with the source named
            raise ValueError(f"Could not read {path} as {builder} data: {e}") from e
    try:
        return load_dataset(path, name, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        raise ValueError(f"Could not load hub dataset '{path}' (config={name}, split={split}): {e}") from e


def check_fields(ds: Dataset | IterableDataset, fields: list[str], where: str) -> None:
    """Raise a clear error when the dataset is empty or lacks one of `fields`."""
    if isinstance(ds, Dataset) and len(ds) == 0:
        raise ValueError(f"Data source {where} is empty.")
    columns = ds.column_names
    if columns is None:  # streaming without known features: look at the first example
        first = next(iter(ds.take(1)), None)
        if first is None:
            raise ValueError(f"Data source {where} is empty.")
        columns = list(first)
    for field_name in fields:
        if field_name not in columns:
            raise ValueError(
                f"Data source {where} has no field '{field_name}' (columns: {columns}): set the source's field name."
            )


def require_eos(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "The tokenizer has no EOS token, which separates packed documents: set tokenizer.eos_token."
        )
    return int(eos)


def tokenize_source(
    ds: Dataset | IterableDataset, tokenizer: Any, text_field: str, *, batch_size: int, num_proc: int | None
) -> Dataset | IterableDataset:
    """Batched tokenisation to a single `input_ids` column (no special tokens; EOS is added at packing)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [t if isinstance(t, str) else "" for t in batch[text_field]]
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}

    columns = ds.column_names
    kwargs: dict[str, Any] = {"batched": True, "batch_size": batch_size, "remove_columns": columns}
    if isinstance(ds, Dataset):
        kwargs.update(num_proc=num_proc, desc=f"tokenize {text_field}")
    return ds.map(encode, **kwargs)


# --------------------------------------------------------------------------------------------------
# Document cursors: one per source and rank, resumable
# --------------------------------------------------------------------------------------------------
class DocumentCursor:
    """Endless, resumable iterator over one rank's documents of a map-style dataset.

    Each epoch draws a fresh permutation from (seed, epoch); the rank takes every world_size-th entry,
    so ranks are disjoint within an epoch. The state is just (epoch, position).
    """

    def __init__(
        self,
        ds: Dataset,
        columns: tuple[str, ...],
        *,
        seed: int,
        rank: int,
        world_size: int,
        chunk: int = 256,
    ):
        if len(ds) < world_size:
            raise ValueError(f"Source has {len(ds)} documents, fewer than world_size={world_size}.")
        self.ds, self.columns, self.seed = ds, columns, seed
        self.rank, self.world_size, self.chunk = rank, world_size, chunk
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order()
        self._cache: list[Any] = []
        self._cache_start = 0

    def _epoch_order(self) -> np.ndarray:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.ds))
        return perm[self.rank :: self.world_size]

    def next(self) -> tuple[Any, ...]:
        """The next document as a tuple of its `columns` values."""
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order, self._cache = self._epoch_order(), []
        offset = self.pos - self._cache_start
        if not self._cache or not 0 <= offset < len(self._cache):
            self._cache_start = self.pos
            idx = self._order[self.pos : self.pos + self.chunk].tolist()
            rows = self.ds[idx]
            self._cache = list(zip(*(rows[c] for c in self.columns)))
            offset = 0
        self.pos += 1
        return self._cache[offset]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order, self._cache = self._epoch_order(), []


class StreamingCursor:
    """Endless, resumable iterator over one rank's documents of a streaming dataset (file order).

    Sharding uses `split_dataset_by_node` (whole files when they divide evenly, else every
    world_size-th example); resuming uses the dataset's own `state_dict`, which is exact without a
    shuffle buffer.
    """

    def __init__(self, ds: IterableDataset, columns: tuple[str, ...], *, rank: int, world_size: int):
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.columns = columns
        self.epoch, self.docs_in_epoch = 0, 0
        self._it: Iterator[dict] | None = None

    def next(self) -> tuple[Any, ...]:
        if self._it is None:
            self.ds.set_epoch(self.epoch)
            self._it = iter(self.ds)
        example = next(self._it, None)
        if example is None:
            if self.docs_in_epoch == 0:
                raise ValueError("Streaming source yielded no documents for this rank.")
            # A new epoch number makes `datasets` ignore the loaded starting state and restart the files.
            self.epoch, self.docs_in_epoch, self._it = self.epoch + 1, 0, None
            return self.next()
        self.docs_in_epoch += 1
        return tuple(example[c] for c in self.columns)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "docs": self.docs_in_epoch, "hf": self.ds.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.docs_in_epoch = int(state["epoch"]), int(state["docs"])
        self.ds.set_epoch(self.epoch)
        self.ds.load_state_dict(state["hf"])
        self._it = None


Cursor = DocumentCursor | StreamingCursor


def build_cursor(
    ds: Dataset | IterableDataset, columns: tuple[str, ...], *, seed: int, rank: int, world_size: int
) -> Cursor:
    if isinstance(ds, IterableDataset):
        return StreamingCursor(ds, columns, rank=rank, world_size=world_size)
    return DocumentCursor(ds, columns, seed=seed, rank=rank, world_size=world_size)


# --------------------------------------------------------------------------------------------------
# Token mixer: which source gives the next document
# --------------------------------------------------------------------------------------------------
def pick_source(tokens: dict[str, int], weights: dict[str, float]) -> str:
    """The source furthest behind its token share (smallest tokens / weight); ties go to the first.

    Deterministic (no RNG state to save) and exact in token proportions up to one document per source.
    """
    active = [k for k, w in weights.items() if w > 0]
    return min(active, key=lambda k: (tokens.get(k, 0) / weights[k], active.index(k)))


# --------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------
class TrainStream:
    """Iterable of micro-batches {input_ids, labels, position_ids: LongTensor[B, S]} of one rank.

    Subclasses implement `next_batch` and `state_dict` / `load_state_dict`; a stream built from the
    same config and rank and given a saved state yields exactly the batches that followed the save.
    """

    def __init__(self, micro_batch_size: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}.")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.batches_emitted = 0

    current_stage: str = "main"

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.next_batch()
        self.batches_emitted += 1
        return batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _check_state(self, state: dict[str, Any], kind: str) -> None:
        if state.get("kind") != kind or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Not a {kind} stream state (kind={state.get('kind')}, version={state.get('version')})."
            )
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"Stream state was saved on rank {state['rank']}/{state['world_size']}, "
                f"loading on rank {self.rank}/{self.world_size}: resume with the same world size."
            )


# Batch key of a [B, S] 1/0 mask of real (non-padding) tokens; model inputs never include it.
TOKEN_MASK = "token_mask"


def to_batch(input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
    }


class PackedTextStream(TrainStream):
    """Pre-training stream: documents mixed by token share, EOS-separated, packed into full rows."""

    def __init__(
        self,
        cfg: DataConfig,
        cursors: dict[str, Cursor],
        eos_id: int,
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
    ):
        super().__init__(micro_batch_size, rank, world_size)
        self.cfg, self.cursors, self.eos_id = cfg, cursors, eos_id
        self.stage_idx = 0
        self.stage_tokens = 0  # global tokens emitted in the current stage
        self.source_tokens: dict[str, int] = {k: 0 for k in cursors}  # this rank, current stage
        self.buffer: list[int] = []  # tokens read but not yet emitted
        self.buffer_starts: list[bool] = []  # True where a document starts

    @property
    def current_stage(self) -> str:  # type: ignore[override]
        return self.cfg.stages[self.stage_idx].name if self.cfg.stages else "main"

    def _seq_len(self) -> int:
        if self.cfg.stages and self.cfg.stages[self.stage_idx].seq_len:
            return int(self.cfg.stages[self.stage_idx].seq_len)
        return self.cfg.seq_len

    def _advance_stage(self) -> None:
        """Move past every stage whose budget is spent; StopIteration after the last one."""
        while self.cfg.stages and self.stage_tokens >= self.cfg.stages[self.stage_idx].tokens:
            if self.stage_idx + 1 >= len(self.cfg.stages):
                raise StopIteration
            self.stage_idx += 1
            self.stage_tokens = 0
            self.source_tokens = {k: 0 for k in self.cursors}

    def _read_document(self) -> None:
        weights = stage_weights(self.cfg, self.stage_idx)
        key = pick_source(self.source_tokens, weights)
        doc = list(self.cursors[key].next()[0]) + [self.eos_id]
        self.source_tokens[key] += len(doc)
        self.buffer.extend(doc)
        self.buffer_starts.extend([True] + [False] * (len(doc) - 1))

    def next_batch(self) -> dict[str, torch.Tensor]:
        self._advance_stage()
        seq_len, n = self._seq_len(), self.micro_batch_size * self._seq_len()
        while len(self.buffer) < n:
            self._read_document()
        ids_BS = np.asarray(self.buffer[:n], dtype=np.int64).reshape(self.micro_batch_size, seq_len)
        starts_BS = np.asarray(self.buffer_starts[:n], dtype=bool).reshape(self.micro_batch_size, seq_len)
        del self.buffer[:n], self.buffer_starts[:n]
        self.stage_tokens += n * self.world_size  # every rank emits the same number of tokens per batch
        labels_BS = ids_BS.copy()
        if self.cfg.document_masking:
            starts_BS[:, 0] = True  # each row is its own context: a continued document restarts at 0
            labels_BS[:, 1:][starts_BS[:, 1:]] = -100  # never predict a document from the previous one
            pos_BS = positions_from_starts(starts_BS)
        else:
            pos_BS = np.broadcast_to(
                np.arange(seq_len, dtype=np.int64), (self.micro_batch_size, seq_len)
            ).copy()
        return to_batch(ids_BS, labels_BS, pos_BS)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "pretrain",
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "batches_emitted": self.batches_emitted,
            "stage_idx": self.stage_idx,
            "stage_tokens": self.stage_tokens,
            "source_tokens": dict(self.source_tokens),
            "buffer": list(self.buffer),
            "buffer_starts": list(self.buffer_starts),
            "cursors": {k: c.state_dict() for k, c in self.cursors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, "pretrain")
        if set(state["cursors"]) != set(self.cursors):
            raise ValueError(
                f"Stream state has sources {sorted(state['cursors'])}, config has {sorted(self.cursors)}."
            )
        self.batches_emitted = int(state["batches_emitted"])
        self.stage_idx, self.stage_tokens = int(state["stage_idx"]), int(state["stage_tokens"])
        self.source_tokens = {k: int(v) for k, v in state["source_tokens"].items()}
        self.buffer, self.buffer_starts = list(state["buffer"]), [bool(b) for b in state["buffer_starts"]]
        for k, c in self.cursors.items():
            c.load_state_dict(state["cursors"][k])


def positions_from_starts(starts_BS: np.ndarray) -> np.ndarray:
    """Position ids that restart at 0 wherever `starts_BS` is True (column 0 must be True)."""
    idx_BS = np.broadcast_to(np.arange(starts_BS.shape[1]), starts_BS.shape)
    last_start_BS = np.maximum.accumulate(np.where(starts_BS, idx_BS, 0), axis=1)
    return (idx_BS - last_start_BS).astype(np.int64)


def document_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] document index per token: a new document starts wherever the position does not go up by 1.

    Same rule as transformers' `masking_utils.find_packed_sequence_indices`.
    """
    prev_BS = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=1)
    return (position_ids - prev_BS != 1).cumsum(dim=1)


def document_attention_mask(position_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Block-diagonal causal boolean mask [B, 1, S, S] (True = may attend) for packed rows.

    Passed as `attention_mask`, transformers uses a 4-D mask as-is for every layer, so on a model with
    sliding-window layers give the window here (or rely on reset `position_ids` with no mask at all).
    """
    doc_BS = document_ids_from_positions(position_ids)
    s = position_ids.shape[1]
    q_S1 = torch.arange(s).unsqueeze(1)
    k_1S = torch.arange(s).unsqueeze(0)
    causal_SS = k_1S <= q_S1
    if sliding_window is not None:
        causal_SS = causal_SS & (q_S1 - k_1S < sliding_window)
    same_doc_BSS = doc_BS.unsqueeze(2) == doc_BS.unsqueeze(1)
    return (same_doc_BSS & causal_SS).unsqueeze(1)


def document_attention_masks(position_ids: torch.Tensor, config: Any) -> dict[str, torch.Tensor]:
    """Per-layer-type document masks for `model(attention_mask=...)`: exact whatever `use_cache` is.

    The model takes a dict keyed by `config.layer_types` entries as already-built masks; sliding layers
    get `config.sliding_window` (the mask is [B, 1, S, S] booleans: B*S*S bytes per layer type).
    """
    window = getattr(config, "sliding_window", None)
    masks: dict[str, torch.Tensor] = {}
    for layer_type in dict.fromkeys(config.layer_types):
        sliding = layer_type == "sliding_attention"
        masks[layer_type] = document_attention_mask(position_ids, window if sliding else None)
    return masks


def open_cursors(
    sources: list[Any],
    prepare: Callable[[Dataset | IterableDataset, Any], Dataset | IterableDataset],
    *,
    streaming: bool,
    seed: int,
    rank: int,
    world_size: int,
    columns: tuple[str, ...],
) -> dict[str, Cursor]:
    """One cursor per source (keyed by `source.key`) over `prepare(raw_dataset, source)`."""
    cursors: dict[str, Cursor] = {}
    for i, src in enumerate(sources):
        raw = load_raw_source(src.path, src.name, src.split, streaming)
        ds = prepare(raw, src)
        # Each source gets its own seed so two sources of the same size are not shuffled alike.
        cursors[src.key] = build_cursor(ds, columns, seed=seed * 1000 + i, rank=rank, world_size=world_size)
    return cursors


def build_train_stream(
    cfg: DataConfig, tokenizer: Any, *, micro_batch_size: int, rank: int = 0, world_size: int = 1
) -> PackedTextStream:
    """The pre-training micro-batch stream of one rank (see module docstring for the layout)."""
    eos_id = require_eos(tokenizer)

    def tokenize(ds: Dataset | IterableDataset, src: SourceConfig) -> Dataset | IterableDataset:
        check_fields(ds, [src.text_field], src.path)
        return tokenize_source(
            ds, tokenizer, src.text_field, batch_size=cfg.tokenize_batch_size, num_proc=cfg.num_proc
        )

    cursors = open_cursors(
        cfg.sources,
        tokenize,
        streaming=cfg.streaming,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        columns=("input_ids",),
    )
    return PackedTextStream(
        cfg, cursors, eos_id, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size
    )
