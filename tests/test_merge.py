"""Checkpoint merging: exact arithmetic on real safetensors checkpoints, config checks, atomic output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from smallthinker.merge import merge_checkpoints, weight_map
from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from tests.train.fixtures_data import chat_tokenizer

REPO = Path(__file__).resolve().parents[1]


def save_tiny(path: Path, seed: int, dtype: torch.dtype, shard: str | None = None) -> Path:
    torch.manual_seed(seed)
    model = SmallThinkerForCausalLM(load_model_config("tiny-4b-style", num_hidden_layers=2)).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def read_all(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, file_name in weight_map(checkpoint).items():
        with safe_open(str(checkpoint / file_name), framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_tensors_are_the_weighted_sum(tmp_path, dtype):
    # different shard layouts across inputs: the output follows the first
    inputs = [
        save_tiny(tmp_path / "a", 0, dtype, shard="1MB"),
        save_tiny(tmp_path / "b", 1, dtype),
        save_tiny(tmp_path / "c", 2, dtype, shard="2MB"),
    ]
    chat_tokenizer().save_pretrained(inputs[0])
    weights = [0.5, 0.3, 0.2]
    out = merge_checkpoints(inputs, weights, tmp_path / "merged", progress=False)

    assert len(set(weight_map(out).values())) == len(set(weight_map(inputs[0]).values())) > 1
    ins = [read_all(p) for p in inputs]
    merged = read_all(out)
    assert set(merged) == set(ins[0]) and any(".experts.3.gate.weight" in k for k in merged)
    for name, t in merged.items():
        expected = sum(w * src[name].float() for w, src in zip(weights, ins)).to(dtype)
        assert t.dtype == dtype
        assert torch.equal(t, expected), name
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / side).is_file()
    assert json.loads((out / "merge_recipe.json").read_text())["weights"] == weights

    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    name = "model.layers.1.block_sparse_moe.experts.3.down.weight"
    assert torch.equal(model.model.layers[1].block_sparse_moe.experts.down_proj[3], merged[name])
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_mismatched_configs_and_bad_weights_are_refused(tmp_path):
    a = save_tiny(tmp_path / "a", 0, torch.float32)
    b = save_tiny(tmp_path / "b", 1, torch.float32)
    cfg = json.loads((b / "config.json").read_text())
    cfg["_name_or_path"] = "somewhere/else"  # provenance does not matter
    (b / "config.json").write_text(json.dumps(cfg))
    merge_checkpoints([a, b], [0.5, 0.5], tmp_path / "ok", progress=False)

    cfg["moe_num_active_primary_experts"] = 3
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'moe_num_active_primary_experts' differs"):
        merge_checkpoints([a, b], [0.5, 0.5], tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="sum to 1.2"):
        merge_checkpoints([a, a], [0.6, 0.6], tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="one weight per input"):
        merge_checkpoints([a, a], [1.0], tmp_path / "bad", progress=False)
    # task-arithmetic style weights are allowed when asked for
    out = merge_checkpoints([a, a], [0.6, 0.6], tmp_path / "scaled", normalize=False, progress=False)
    name = "model.norm.weight"
    assert torch.equal(read_all(out)[name], 0.6 * read_all(a)[name] + 0.6 * read_all(a)[name])


def test_cli_refuses_to_overwrite_and_replaces_atomically(tmp_path):
    a = save_tiny(tmp_path / "a", 0, torch.float32)
    b = save_tiny(tmp_path / "b", 1, torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cmd = [sys.executable, "-m", "scripts.merge", "--inputs", str(a), str(b), "--weights", "0.25", "0.75"]
    refused = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr
    assert (out / "keep.txt").read_text() == "precious"

    done = subprocess.run([*cmd, "--out", str(out), "--overwrite"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (out / "keep.txt").exists()
    name = "model.embed_tokens.weight"
    assert torch.equal(read_all(out)[name], 0.25 * read_all(a)[name] + 0.75 * read_all(b)[name])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
