"""Checkpoint merging: weighted linear interpolation of N checkpoints of one architecture.

SmallThinker's post-training ends by linearly interpolating checkpoints from different SFT stages
(arXiv 2507.20984, section 5). This works on the safetensors files directly, one tensor at a time:
memory holds one output shard plus one tensor per input, never a whole model. Floating tensors are
combined in fp32 (fp64 stays fp64), in input order, and cast back to their dtype; other tensors must
be equal in every input and are copied.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from smallthinker.integrity import normalise_file_modes
from smallthinker.modeling.configuration_smallthinker import EXTENSION_KEYS

SINGLE_FILE = SAFE_WEIGHTS_NAME
INDEX_FILE = SAFE_WEIGHTS_INDEX_NAME
# Keys that do not change what the weights mean: provenance and training-only switches.
IGNORED_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_router_logits",
        *EXTENSION_KEYS,  # training-only loss weights
    }
)
# Files copied from the first input next to the merged weights: config, tokenizer, remote code (not
# training state such as optimizer or data-stream files).
COPIED_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "*.py",
)
WEIGHT_SUM_TOLERANCE = 1e-6


def weight_map(checkpoint: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name of a checkpoint directory."""
    index = checkpoint / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = checkpoint / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    raise FileNotFoundError(
        f"{checkpoint} has no {SINGLE_FILE} or {INDEX_FILE}: only safetensors checkpoints merge."
    )


def load_config_dict(checkpoint: Path) -> dict:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no config.json: not a checkpoint directory.")
    return json.loads(path.read_text())


def check_same_config(checkpoints: Sequence[Path]) -> None:
    """Raise naming the first differing config field (provenance keys ignored)."""
    reference = {k: v for k, v in load_config_dict(checkpoints[0]).items() if k not in IGNORED_CONFIG_KEYS}
    for other in checkpoints[1:]:
        cfg = {k: v for k, v in load_config_dict(other).items() if k not in IGNORED_CONFIG_KEYS}
        for key in sorted(set(reference) | set(cfg)):
            if reference.get(key, "<missing>") != cfg.get(key, "<missing>"):
                raise ValueError(
                    f"Config field '{key}' differs: {reference.get(key, '<missing>')!r} in {checkpoints[0]} vs "
                    f"{cfg.get(key, '<missing>')!r} in {other}; only checkpoints of one architecture can be merged."
                )


def check_weights(weights: Sequence[float], n_inputs: int, normalize: bool) -> list[float]:
    if len(weights) != n_inputs:
        raise ValueError(f"Got {len(weights)} weights for {n_inputs} inputs: give one weight per input.")
    if n_inputs < 2:
        raise ValueError("Merging needs at least two input checkpoints.")
    total = sum(weights)
    if normalize and abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"Weights {list(weights)} sum to {total}, not 1: fix them or pass --no-normalize.")
    return [float(w) for w in weights]


def combine(tensors: Sequence[torch.Tensor], weights: Sequence[float], name: str) -> torch.Tensor:
    """sum_i w_i * t_i in fp32 (fp64 for fp64), accumulated in input order, cast back to the dtype."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError(
                f"Tensor '{name}': {tuple(t.shape)} {t.dtype} vs {tuple(first.shape)} {first.dtype}."
            )
    if not first.is_floating_point():
        if any(not torch.equal(t, first) for t in tensors[1:]):
            raise ValueError(f"Non-float tensor '{name}' differs between inputs and cannot be interpolated.")
        return first
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    acc = weights[0] * tensors[0].to(acc_dtype)
    for w, t in zip(weights[1:], tensors[1:]):
        acc = acc + w * t.to(acc_dtype)
    return acc.to(first.dtype)


class _Readers:
    """Open safetensors handles, one per (input, file), closed together."""

    def __init__(self, checkpoints: Sequence[Path]):
        self.checkpoints = checkpoints
        self.maps = [weight_map(c) for c in checkpoints]
        self._handles: dict[tuple[int, str], object] = {}

    def get(self, i: int, name: str) -> torch.Tensor:
        key = (i, self.maps[i][name])
        if key not in self._handles:
            self._handles[key] = safe_open(str(self.checkpoints[i] / key[1]), framework="pt")
        return self._handles[key].get_tensor(name)

    def close_all(self) -> None:
        """Drop every handle, and with it the mapped pages of files already read (keeps RSS at one shard)."""
        self._handles.clear()


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh temporary directory next to `out` (so the final rename stays on one file system)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: choose another --out or pass --overwrite.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished temporary directory in; an old `out` is removed only after the swap."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _copy_side_files(src: Path, dst: Path) -> None:
    for path in sorted(src.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in COPIED_PATTERNS):
            shutil.copy2(path, dst / path.name)


def merge_checkpoints(
    inputs: Sequence[str | Path],
    weights: Sequence[float],
    out: str | Path,
    *,
    normalize: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write sum_i weights[i] * inputs[i] to `out` as a normal checkpoint directory; returns `out`.

    The output keeps the first input's shard layout, dtypes, config, generation config and tokenizer.
    `normalize=True` requires the weights to sum to 1; `normalize=False` takes them as given.
    """
    checkpoints = [Path(p) for p in inputs]
    out = Path(out)
    weights = check_weights(weights, len(checkpoints), normalize)
    check_same_config(checkpoints)
    readers = _Readers(checkpoints)
    names = set(readers.maps[0])
    for c, m in zip(checkpoints[1:], readers.maps[1:]):
        if set(m) != names:
            diff = sorted(names ^ set(m))
            raise ValueError(f"{c} and {checkpoints[0]} hold different tensors, e.g. {diff[:5]}.")
    tmp = _prepare_out(out, overwrite)
    try:
        by_file: dict[str, list[str]] = {}
        for name, file_name in readers.maps[0].items():
            by_file.setdefault(file_name, []).append(name)
        bar = tqdm(total=len(names), desc="merge", unit="tensor", disable=not progress)
        for file_name, file_names in sorted(by_file.items()):
            shard = {}
            for name in sorted(file_names):
                shard[name] = combine([readers.get(i, name) for i in range(len(checkpoints))], weights, name)
                bar.update()
            save_file(shard, str(tmp / file_name), metadata={"format": "pt"})
            del shard
            readers.close_all()
        bar.close()
        normalise_file_modes(tmp)  # safetensors writes 0600 files; the copied side files follow the umask
        _copy_side_files(checkpoints[0], tmp)
        if (checkpoints[0] / INDEX_FILE).is_file():
            index = json.loads((checkpoints[0] / INDEX_FILE).read_text())
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        recipe = {"inputs": [str(c) for c in checkpoints], "weights": weights, "normalize": normalize}
        (tmp / "merge_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
