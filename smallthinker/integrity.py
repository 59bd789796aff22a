"""Checks of checkpoint files on disk, made before loading them, so a bad file is named instead of failing
deep inside a loader: truncated or corrupted safetensors files, configs of other model families.

Training, inference and the apps all use it; it reads only files and the model's own identification rule.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from smallthinker.modeling.configuration_smallthinker import (
    SMALLTHINKER_ARCHITECTURES,
    is_smallthinker_config,
)

# A safetensors file starts with the byte length of its JSON header (little-endian u64); headers above
# this size are not plausible and mean the file is not safetensors at all.
MAX_HEADER_BYTES = 100 * 2**20


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, or belongs to another model family."""


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with one safetensors file (None when its header parses and its size matches it)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"{path} is truncated ({size} bytes, shorter than a safetensors header)"
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                return f"{path} is not a safetensors file (its first 8 bytes give a {header_len}-byte header)"
            if header_len > size - 8:
                return f"{path} is truncated: {size} bytes, shorter than its {8 + header_len}-byte header"
            header = json.loads(f.read(header_len))
    except OSError as err:
        return f"{path} cannot be read ({err.strerror or err})"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{path} is corrupted (its safetensors header is not valid JSON)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"{path} is truncated: {size} bytes, its header describes {expected}"
    return None


def weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its index names, else every *.safetensors."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint / n for n in names]
    return sorted(checkpoint.glob("*.safetensors"))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a `save_pretrained` directory's config and weight files (None when intact)."""
    if not checkpoint.is_dir():
        return (
            f"{checkpoint} does not exist" if not checkpoint.exists() else f"{checkpoint} is not a directory"
        )
    if not (checkpoint / "config.json").is_file():
        return f"{checkpoint} has no config.json: not a checkpoint directory"
    files = weight_files(checkpoint)
    if not files:
        return f"{checkpoint} has no *.safetensors weights"
    for path in files:
        if not path.is_file():
            return f"{path} is missing (named by {checkpoint / 'model.safetensors.index.json'})"
        problem = safetensors_problem(path)
        if problem:
            return problem
    return None


def model_family_problem(checkpoint: Path) -> str | None:
    """None when `checkpoint/config.json` describes a SmallThinker model, else what it describes instead.

    The published 21B config.json has no model_type: its architectures entry identifies it.
    """
    try:
        values = json.loads((checkpoint / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"cannot read {checkpoint / 'config.json'} ({err})"
    if is_smallthinker_config(values):
        return None
    return (
        f"{checkpoint} is not a SmallThinker checkpoint (model_type={values.get('model_type')!r}, "
        f"architectures={values.get('architectures') or []}); expected model_type 'smallthinker' or "
        f"architectures {list(SMALLTHINKER_ARCHITECTURES)}"
    )


def require_smallthinker_checkpoint(checkpoint: str | Path, weights: bool = True) -> Path:
    """Raise CheckpointFileError naming the problem unless `checkpoint` is a SmallThinker directory whose
    weight files are intact (`weights=False`: only its config is checked). The model family is checked
    first: a foreign checkpoint is refused by name whatever its files."""
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        problem = checkpoint_problem(path)
    else:
        problem = model_family_problem(path) or (checkpoint_problem(path) if weights else None)
    if problem:
        raise CheckpointFileError(problem)
    return path


def default_file_mode() -> int:
    """The mode `open(..., "w")` gives a new file under the current umask (0o644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def normalise_file_modes(directory: Path, pattern: str = "*.safetensors") -> None:
    """Give files written through a temporary file (mode 0600) the mode every other file of the run has."""
    mode = default_file_mode()
    for path in directory.glob(pattern):
        os.chmod(path, mode)
