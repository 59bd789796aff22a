"""Named model presets: JSON files under `configs/model/`, loaded into a `SmallThinkerConfig`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .configuration_smallthinker import SmallThinkerConfig

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_model_config(name_or_path: str | Path, **overrides: Any) -> SmallThinkerConfig:
    """A preset name (`smallthinker-4b`, `tiny-21b-style`, ...), a JSON file or a checkpoint directory."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    elif not path.suffix and not path.exists():
        path = PRESETS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"No model config at {name_or_path!s}: give a JSON file, a checkpoint directory or one of the presets "
            f"{list_presets()}."
        )
    values = json.loads(path.read_text())
    values.pop("auto_map", None)
    values.pop("model_type", None)
    values.update(overrides)
    # Derived layouts follow a changed depth unless given explicitly.
    if "num_hidden_layers" in overrides:
        for key in ("rope_layout", "sliding_window_layout"):
            if key not in overrides and len(values.get(key) or []) != overrides["num_hidden_layers"]:
                pattern = values.get(key) or [0]
                period = _period(pattern)
                values[key] = [pattern[i % period] for i in range(overrides["num_hidden_layers"])]
    return SmallThinkerConfig(**values)


def _period(pattern: list[int]) -> int:
    """Length of the shortest repeating unit of a layer layout ([0,1,1,1]*13 -> 4)."""
    for p in range(1, len(pattern) + 1):
        if all(pattern[i] == pattern[i % p] for i in range(len(pattern))):
            return p
    return len(pattern)
