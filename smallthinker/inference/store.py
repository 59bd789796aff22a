"""The on-disk expert store: one flat file of 4 KiB aligned expert records plus a json manifest.

Layout of a store directory (written once by ``convert_checkpoint``):

- ``experts.bin``: records in layer-major order, record ``(l, j)`` at ``(l * E + j) * record_bytes``.
  A record holds one expert's three matrices back to back, laid out for the decode kernels:
  ``gate [F, H]`` and ``up [F, H]`` (rows = neurons, so neuron-sparse ``up`` is a row gather) and
  ``down_t [F, H]`` (``down`` transposed, so its neuron rows are contiguous too). The int8 store keeps
  ``down [H, F]`` untransposed because the int8 kernel wants ``[out, in]``, plus per-channel scales. The int4
  store keeps ``gate``, ``up`` and ``down`` as nibble-packed codes (``formats.pack_nibbles``) with bf16 scales and
  zeros per row and group of 32 (``[N, K / 32, 2]``): the native kernel's layout, the same on every machine
  (the manifest says ``"int4_layout": "nibbles"``).
- ``manifest.json``: shapes, dtypes, offsets and a crc32 per record.
- ``resident.safetensors``: every non-expert weight (embeddings, attention, norms, routers, head),
  loaded into memory at start-up. A tied ``lm_head`` is not stored twice.
- ``config.json`` and the tokenizer / generation files copied from the source checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from smallthinker.inference.formats import (
    DEFAULT_GROUP_SIZE as INT4_GROUP_SIZE,
)
from smallthinker.inference.formats import (
    pack_nibbles,
    quantize_int4_groups,
    rows_first,
)
from smallthinker.inference.io import ALIGNMENT, DirectFile, align_up, aligned_buffer
from smallthinker.inference.quant import quantize_int8_rows
from smallthinker.integrity import normalise_file_modes
from smallthinker.modeling.modeling_smallthinker import (
    EXPERT_PROJECTIONS,
    expert_tensor_name,
    experts_prefix,
    is_expert_tensor,
)

STORE_FORMAT = "smallthinker-expert-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
EXPERTS_FILE = "experts.bin"
RESIDENT_FILE = "resident.safetensors"
QUANT_MODES = ("none", "int8", "int4")
INT4_LAYOUT = "nibbles"  # formats.pack_nibbles codes, [N, K / 32, 2] bf16 scales and zeros

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


class StoreError(ValueError):
    """The store on disk is missing, truncated, corrupted or of an unknown format."""


@dataclass(frozen=True)
class TensorSlot:
    """Where one matrix lives inside an expert record."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return _DTYPES[self.dtype].itemsize * int(torch.Size(self.shape).numel())


def record_layout(quant: str, dtype: torch.dtype, hidden: int, ffn: int) -> tuple[list[TensorSlot], int]:
    """The tensors of one expert record and the record size (a multiple of ``ALIGNMENT``)."""
    dname = str(dtype).removeprefix("torch.")
    if quant == "none":
        specs = [
            ("gate", dname, (ffn, hidden)),
            ("up", dname, (ffn, hidden)),
            ("down_t", dname, (ffn, hidden)),
        ]
    elif quant == "int8":
        specs = [
            ("gate_q", "int8", (ffn, hidden)),
            ("up_q", "int8", (ffn, hidden)),
            ("down_q", "int8", (hidden, ffn)),
            ("gate_scale", dname, (ffn,)),
            ("up_scale", dname, (ffn,)),
            ("down_scale", dname, (hidden,)),
        ]
    elif quant == "int4":
        g = INT4_GROUP_SIZE
        specs = [
            ("gate_q4", "uint8", (ffn, hidden // 2)),
            ("up_q4", "uint8", (ffn, hidden // 2)),
            ("down_q4", "uint8", (hidden, ffn // 2)),
            ("gate_sz", "bfloat16", (ffn, hidden // g, 2)),
            ("up_sz", "bfloat16", (ffn, hidden // g, 2)),
            ("down_sz", "bfloat16", (hidden, ffn // g, 2)),
        ]
    else:
        raise ValueError(f"unknown quantisation {quant!r}; choose one of {QUANT_MODES}")
    slots, offset = [], 0
    for name, dt, shape in specs:
        slot = TensorSlot(name, dt, shape, offset)
        slots.append(slot)
        offset = align_up(offset + slot.nbytes, 64)  # 64 B: cache-line aligned tensors inside a record
    return slots, align_up(offset, ALIGNMENT)


def _checkpoint_index(src: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, over all shards of a checkpoint directory."""
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {src}; expected a Hugging Face checkpoint directory"
        )
    index = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), file))
    return index


class _CheckpointReader:
    """Reads tensors by name from the shards of a checkpoint, keeping the shard handles open."""

    def __init__(self, src: Path) -> None:
        self.index = _checkpoint_index(src)
        self._handles = {}

    def get(self, name: str) -> torch.Tensor:
        file = self.index[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_tensor(name)

    def expert(self, layer: int, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate [F, H], up [F, H], down [H, F] of expert j, from per-expert or fused 3-D tensors."""
        if expert_tensor_name(layer, j, "gate") in self.index:
            return tuple(self.get(expert_tensor_name(layer, j, n)) for n in EXPERT_PROJECTIONS)
        prefix = experts_prefix(layer)
        gate_up_2FH = self.get(f"{prefix}.gate_up_proj")[j]
        gate_FH, up_FH = gate_up_2FH.chunk(2, dim=0)  # gate rows first, then up rows
        return gate_FH, up_FH, self.get(f"{prefix}.down_proj")[j]


def _int4_parts(name: str, w_NK: torch.Tensor) -> dict[str, torch.Tensor]:
    codes, scales_zeros = quantize_int4_groups(w_NK, INT4_GROUP_SIZE)
    return {f"{name}_q4": pack_nibbles(codes), f"{name}_sz": rows_first(scales_zeros).to(torch.bfloat16)}


def _pack_record(
    gate_FH: torch.Tensor, up_FH: torch.Tensor, down_HF: torch.Tensor, quant: str, slots, record_bytes: int
) -> bytes:
    if quant == "none":
        parts = {"gate": gate_FH, "up": up_FH, "down_t": down_HF.t()}
    elif quant == "int4":
        parts = {**_int4_parts("gate", gate_FH), **_int4_parts("up", up_FH), **_int4_parts("down", down_HF)}
    else:
        dtype = gate_FH.dtype
        (gq, gs), (uq, us), (dq, ds) = (quantize_int8_rows(w, dtype) for w in (gate_FH, up_FH, down_HF))
        parts = {"gate_q": gq, "up_q": uq, "down_q": dq, "gate_scale": gs, "up_scale": us, "down_scale": ds}
    record = bytearray(record_bytes)
    for slot in slots:
        raw = parts[slot.name].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        record[slot.offset : slot.offset + len(raw)] = raw
    return bytes(record)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, quant: str = "none") -> Path:
    """Write an expert store for the checkpoint directory ``src`` into ``dst`` (created; must be empty)."""
    src, dst = Path(src), Path(dst)
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quantisation {quant!r}; choose one of {QUANT_MODES}")
    config = json.loads((src / "config.json").read_text())
    num_layers, num_experts = config["num_hidden_layers"], config["moe_num_primary_experts"]
    hidden, ffn = config["hidden_size"], config["moe_ffn_hidden_size"]
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; pick a new directory for the store")
    dst.mkdir(parents=True, exist_ok=True)
    reader = _CheckpointReader(src)
    dtype = reader.expert(0, 0)[0].dtype
    slots, record_bytes = record_layout(quant, dtype, hidden, ffn)

    experts = []
    with open(dst / EXPERTS_FILE, "wb") as out:
        for layer in tqdm(range(num_layers), desc="experts", unit="layer"):
            row = []
            for j in range(num_experts):
                record = _pack_record(*reader.expert(layer, j), quant, slots, record_bytes)
                row.append({"offset": out.tell(), "crc32": zlib.crc32(record)})
                out.write(record)
            experts.append(row)
        out.flush()
        os.fsync(out.fileno())
        os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # don't leave 8 GB in the page cache

    _write_resident(reader, config, dst / RESIDENT_FILE)
    normalise_file_modes(dst)  # safetensors writes 0600 files; the store's other files follow the umask
    manifest = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "quant": quant,
        **({"group_size": INT4_GROUP_SIZE, "int4_layout": INT4_LAYOUT} if quant == "int4" else {}),
        "dtype": str(dtype).removeprefix("torch."),
        "num_layers": num_layers,
        "num_experts": num_experts,
        "hidden_size": hidden,
        "ffn_size": ffn,
        "record_bytes": record_bytes,
        "tensors": [
            {"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "offset": s.offset} for s in slots
        ],
        "experts": experts,
    }
    (dst / MANIFEST).write_text(json.dumps(manifest))
    for extra in src.iterdir():  # config, tokenizer, generation config, chat template ...
        if (
            extra.is_file()
            and not extra.name.endswith(".safetensors")
            and extra.name != SAFE_WEIGHTS_INDEX_NAME
        ):
            shutil.copy2(extra, dst / extra.name)
    return dst


def _write_resident(reader: _CheckpointReader, config: dict, path: Path) -> None:
    tied = config.get("tie_word_embeddings", True)
    names = [n for n in reader.index if not is_expert_tensor(n) and not (tied and n == "lm_head.weight")]
    save_file({n: reader.get(n).contiguous() for n in names}, str(path), metadata={"format": "pt"})


def load_resident(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file into freshly allocated tensors with plain reads.

    ``safetensors.load_file`` goes through an mmap of the file: its touched pages count in the process
    RSS next to the copies, doubling the peak of resident weights, which a memory budget cannot afford.
    """
    tensors = {}
    with open(path, "rb") as f:
        header, base = _read_header(f)
        for name, info in header.items():
            dtype = _ST_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            out = torch.empty(info["shape"], dtype=dtype)
            f.seek(base + start)
            f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
            assert end - start == out.numel() * out.element_size()
            tensors[name] = out
    return tensors


def _read_header(f) -> tuple[dict, int]:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def resident_size(path: str | os.PathLike) -> tuple[int, torch.dtype]:
    """Bytes of all tensors in a safetensors file (from its header only) and the embedding dtype."""
    with open(path, "rb") as f:
        header, _ = _read_header(f)
    total = sum(info["data_offsets"][1] - info["data_offsets"][0] for info in header.values())
    return total, _ST_DTYPES[header["model.embed_tokens.weight"]["dtype"]]


class ExpertStore:
    """Read access to a converted store: manifest, record reads, checksums."""

    def __init__(self, path: str | os.PathLike, direct: bool = True) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise StoreError(
                f"{self.path} has no {MANIFEST}; convert the checkpoint first: "
                f"smallthinker convert-store --src CHECKPOINT --dst {self.path}"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != STORE_FORMAT or self.manifest.get("version") != STORE_VERSION:
            raise StoreError(f"{manifest_path} is not a {STORE_FORMAT} v{STORE_VERSION} manifest")
        m = self.manifest
        self.quant, self.dtype = m["quant"], _DTYPES[m["dtype"]]
        self.num_layers, self.num_experts = m["num_layers"], m["num_experts"]
        self.record_bytes = m["record_bytes"]
        self.slots = [TensorSlot(t["name"], t["dtype"], tuple(t["shape"]), t["offset"]) for t in m["tensors"]]
        self._check_int4_layout()
        self.file = DirectFile(self.path / EXPERTS_FILE, direct=direct)
        self._check_size()

    def _check_int4_layout(self) -> None:
        if self.quant != "int4":
            return
        if self.manifest.get("int4_layout") != INT4_LAYOUT:
            raise StoreError(
                f"{self.path} holds int4 weights in an earlier packing (a torch kernel's, tied to one machine); "
                "convert the checkpoint again: smallthinker convert-store --quant int4 ..."
            )

    def _check_size(self) -> None:
        for layer, row in enumerate(self.manifest["experts"]):
            for j, rec in enumerate(row):
                if rec["offset"] + self.record_bytes > self.file.size:
                    raise StoreError(
                        f"{self.file.path} is truncated ({self.file.size} bytes): layer {layer} expert {j} "
                        f"needs bytes up to {rec['offset'] + self.record_bytes}; re-run the conversion"
                    )

    def read(self, layer: int, expert: int, out_R: torch.Tensor, verify: bool) -> None:
        """Read record (layer, expert) into the aligned uint8 buffer ``out_R``; optionally check its crc32."""
        rec = self.manifest["experts"][layer][expert]
        view = memoryview(out_R.numpy())
        self.file.read_into(view, rec["offset"], f"layer {layer} expert {expert}")
        if verify and zlib.crc32(view) != rec["crc32"]:
            raise StoreError(
                f"checksum mismatch for layer {layer} expert {expert} in {self.file.path} "
                f"(offset {rec['offset']}); the store is corrupted, re-run the conversion"
            )

    def unpack(self, record_R: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensor views (no copy) of one record held in memory."""
        return {
            s.name: record_R[s.offset : s.offset + s.nbytes].view(_DTYPES[s.dtype]).view(s.shape)
            for s in self.slots
        }

    def verify_all(self) -> None:
        """Read every record and check its checksum (raises ``StoreError`` naming the first bad expert)."""
        mm, buf = aligned_buffer(self.record_bytes)
        try:
            for layer in tqdm(range(self.num_layers), desc="verify", unit="layer"):
                for j in range(self.num_experts):
                    self.read(layer, j, buf[: self.record_bytes], verify=True)
        finally:
            del buf
            mm.close()

    @property
    def expert_bytes_total(self) -> int:
        return self.num_layers * self.num_experts * self.record_bytes

    def close(self) -> None:
        self.file.close()
