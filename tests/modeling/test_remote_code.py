"""A checkpoint saved by our class loads with ``trust_remote_code=True`` where ``smallthinker`` is NOT installed.

``save_pretrained`` copies the model code next to the weights (``auto_map``), like the official repositories.
The check runs in a real subprocess started in isolated mode (``python -I``: no PYTHONPATH, no cwd, no user
site) from an empty temp dir, whose first act is to put a meta path finder in front of every other one that
refuses ``smallthinker`` (the package is installed editable in the venv, so the isolation flags alone would
not hide it) and to check that ``import smallthinker`` now fails. It then loads the checkpoint, proves the class
came from transformers' dynamic-module cache, and writes its logits and a greedy continuation to a file that
this process compares with ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from smallthinker.modeling import SmallThinkerForCausalLM
from tests.modeling.official_checkpoint import OFFICIAL_21B_STYLE

CHILD = r'''
import importlib.abc
import sys


class RefuseSmallThinker(importlib.abc.MetaPathFinder):
    """Stands in front of the editable-install finder: the package must look absent."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "smallthinker" or fullname.startswith("smallthinker."):
            raise ImportError(f"{fullname} is hidden: the saved checkpoint must carry its own code")
        return None


sys.meta_path.insert(0, RefuseSmallThinker())
try:
    import smallthinker  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("guard failed: smallthinker is importable in the child")

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

checkpoint, io_dir, modules_cache = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
source = Path(sys.modules[type(model).__module__].__file__).resolve()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert source.is_relative_to(modules_cache.resolve()), source
assert not any(m == "smallthinker" or m.startswith("smallthinker.") for m in sys.modules)
ids = load_file(str(io_dir / "inputs.safetensors"))["input_ids"]
base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
assert type(base).__name__ == "SmallThinkerModel", type(base).__name__
with torch.no_grad():
    hidden = base(ids).last_hidden_state
    logits = model(ids).logits
    generated = model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
save_file({"logits": logits, "hidden": hidden, "generated": generated}, str(io_dir / "child.safetensors"))
print("loaded", type(model).__name__, "from", source)
'''


def run_isolated(
    script: Path, args: list[str], cwd: Path, modules_cache: Path
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_MODULES_CACHE=str(modules_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-I", str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_saved_checkpoint_loads_as_remote_code_without_package(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = {k: v for k, v in OFFICIAL_21B_STYLE.items() if k not in ("architectures", "auto_map")}
    model = SmallThinkerForCausalLM(SmallThinkerForCausalLM.config_class(**cfg)).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    assert (checkpoint / "modeling_smallthinker.py").is_file(), "save_pretrained must copy the model code"
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}, (
        auto_map
    )  # as the official files

    ids = torch.randint(0, cfg["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    io_dir = tmp_path / "io"
    io_dir.mkdir()
    save_file({"input_ids": ids}, str(io_dir / "inputs.safetensors"))
    ours = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert type(ours) is SmallThinkerForCausalLM  # without trust_remote_code, our registered class is used
    with torch.no_grad():
        expected = ours(ids).logits
        expected_hidden = ours.model(ids).last_hidden_state
        expected_generated = ours.generate(
            ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
        )

    script, cwd, modules_cache = tmp_path / "child.py", tmp_path / "cwd", tmp_path / "modules"
    script.write_text(CHILD)
    cwd.mkdir()
    result = run_isolated(script, [str(checkpoint), str(io_dir), str(modules_cache)], cwd, modules_cache)
    assert result.returncode == 0, f"child failed:\n{result.stdout}\n{result.stderr}"
    assert "loaded SmallThinkerForCausalLM" in result.stdout

    child = load_file(str(io_dir / "child.safetensors"))
    torch.testing.assert_close(child["logits"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(child["hidden"], expected_hidden, atol=1e-5, rtol=0)
    assert torch.equal(child["generated"], expected_generated)


def test_isolated_child_really_cannot_import_the_package(tmp_path: Path) -> None:
    """The isolation used above is not vacuous: without the guard the package IS importable in the venv,
    and with it an import fails."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib.util, sys\n"
        "print('found' if importlib.util.find_spec('smallthinker') else 'absent')\n"
        + CHILD.split("from pathlib import Path")[0]
        + "print('guarded')\n"
    )
    result = run_isolated(probe, [], tmp_path, tmp_path / "modules")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["found", "guarded"]
