"""Atomic training checkpoints: a `save_pretrained` directory plus everything needed to resume.

Layout of `RUN_DIR/checkpoints/step_00000100/`:
    config.json, model*.safetensors, tokenizer files   -> AutoModelForCausalLM.from_pretrained(dir)
    train_config.yaml                                   -> the resolved run config
    trainer_state.json                                  -> step, tokens seen, world size
    optimizer.pt, scheduler.pt                          -> written by rank 0
    dcp/                                                -> FSDP2 runs instead of optimizer.pt: weights and
                                                           optimizer state, each rank writing its shards
                                                           (torch.distributed.checkpoint)
    rng_rank{R}.pt, data_rank{R}.pt                     -> one per rank (RNG, data stream position)

Atomicity: everything is written to `.tmp-step_XXXXXXXX`, every file and the directory are fsynced,
then the directory is renamed to its final name (rename is atomic on POSIX) and the parent fsynced.
A kill at any instant leaves either the old set of checkpoints or the old set plus the new one;
a half-written temp directory is never mistaken for a checkpoint and is removed on the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smallthinker.integrity import checkpoint_problem, normalise_file_modes

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
RESUME_FILES = ("scheduler.pt", "train_config.yaml", "rng_rank0.pt", "data_rank0.pt")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not fit the current run."""


@dataclass
class TrainerState:
    step: int
    tokens_seen: int
    world_size: int


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp directories are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str, run_dir: str | Path) -> Path:
    """`latest` -> newest complete checkpoint of the run; otherwise a checkpoint directory path."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_root(run_dir))
        for path in reversed(found):
            problem = resume_problem(path)
            if problem is None:
                return path
            # A checkpoint damaged after it was published (disk fault, partial copy): an older one still works.
            print(f"skipping the incomplete checkpoint {path}: {problem}", file=sys.stderr, flush=True)
        raise CheckpointError(
            f"resume latest: no complete checkpoint in {checkpoint_root(run_dir)} (damaged ones are skipped); "
            "start without resume or point --resume at a checkpoint directory"
        )
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a training checkpoint (no {STATE_FILE}); to start from weights only, "
            "use --model.init_from instead"
        )
    problem = resume_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"cannot resume from {path}: {problem}; resume from another checkpoint of the run"
        )
    return path


def resume_problem(path: Path) -> str | None:
    """What keeps a published checkpoint from being resumed (None when its files are all there and intact)."""
    missing = [name for name in RESUME_FILES if not (path / name).is_file()]
    if not (path / "optimizer.pt").is_file() and not (path / "dcp").is_dir():  # unsharded or FSDP2 optimizer
        missing.append("optimizer.pt (or dcp/)")
    if missing:
        return f"{', '.join(missing)} missing"
    return checkpoint_problem(path)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temp_dir_for(root: Path, step: int) -> Path:
    return root / f".tmp-{step_dir_name(step)}"


def prepare_temp_dir(root: Path, step: int) -> Path:
    """Rank 0: a fresh, empty temp directory (a leftover from a killed save is discarded)."""
    tmp = temp_dir_for(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_files(tmp: Path, rank: int, data_state: dict[str, Any]) -> None:
    """Every rank: its RNG and data-stream state."""
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    torch.save(data_state, tmp / f"data_rank{rank}.pt")


def write_main_files(
    tmp: Path,
    model_to_save: torch.nn.Module,
    model_state: dict[str, torch.Tensor] | None,
    tokenizer: Any,
    optimizer_state: dict[str, Any] | None,
    scheduler_state: dict[str, Any],
    config_yaml: str,
) -> None:
    """Rank 0: model (save_pretrained), tokenizer, optimizer (None: it is in the sharded `dcp/`),
    scheduler and run config."""
    model_to_save.save_pretrained(tmp, state_dict=model_state)
    normalise_file_modes(tmp)  # save_pretrained writes weights through a 0600 temporary file
    tokenizer.save_pretrained(tmp)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    (tmp / "train_config.yaml").write_text(config_yaml)


def publish(tmp: Path, state: TrainerState, keep_last: int) -> Path:
    """Rank 0, after all ranks wrote: state file, fsync, atomic rename, prune old checkpoints."""
    (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=2))
    _fsync_tree(tmp)
    final = tmp.parent / step_dir_name(state.step)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it atomically
        stale = tmp.parent / f".old-{final.name}"
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        tmp.rename(final)
        shutil.rmtree(stale)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)
    if keep_last > 0:
        for old in list_checkpoints(final.parent)[:-keep_last]:
            shutil.rmtree(old)
    return final


def discard_temp(root: Path, step: int) -> None:
    shutil.rmtree(temp_dir_for(root, step), ignore_errors=True)


def read_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def load_rank_files(path: Path, rank: int) -> dict[str, Any]:
    """The data-stream state of this rank; restores this rank's RNG state as a side effect."""
    rng_file, data_file = path / f"rng_rank{rank}.pt", path / f"data_rank{rank}.pt"
    if not rng_file.is_file() or not data_file.is_file():
        raise CheckpointError(f"{path} has no state for rank {rank}: was it written with fewer processes?")
    set_rng_state(torch.load(rng_file, weights_only=False))  # our own file: numpy RNG state is pickled
    return torch.load(data_file, weights_only=False)


def load_all_rank_files(path: Path, saved_world: int) -> list[dict[str, Any]]:
    """The data-stream states of all ranks of a checkpoint written by `saved_world` processes, for a
    run of another size; every rank takes rank 0's RNG state, as every rank of a fresh run starts from
    the same seed."""
    missing = [r for r in range(saved_world) if not (path / f"data_rank{r}.pt").is_file()]
    if missing or not (path / "rng_rank0.pt").is_file():
        raise CheckpointError(
            f"{path} lacks the data or RNG state of ranks {missing or [0]}: it is incomplete"
        )
    set_rng_state(torch.load(path / "rng_rank0.pt", weights_only=False))
    return [torch.load(path / f"data_rank{r}.pt", weights_only=False) for r in range(saved_world)]


def load_scheduler(path: Path) -> dict[str, Any]:
    return torch.load(path / "scheduler.pt", weights_only=False)


def load_optimizer(path: Path) -> dict[str, Any]:
    """The optimizer state of an unsharded run (`optimizer.pt`)."""
    if not (path / "optimizer.pt").is_file():
        raise CheckpointError(
            f"{path} has neither optimizer.pt nor a sharded dcp/ directory: it is incomplete"
        )
    return torch.load(path / "optimizer.pt", weights_only=False)
