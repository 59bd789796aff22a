"""`pip install .` (not editable) into a fresh virtual environment, then `smallthinker demo --reduced` from
another folder: the recipes and presets the library reads ship inside the package, and `scripts` is not
installed as a top-level package.

The new environment reuses this interpreter's installed dependencies (a `.pth` line, as
`--system-site-packages` would for a system interpreter) so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "runs", "data", "stores", "build", "dist", "*.egg-info",
                                 "__pycache__", ".pytest_cache", ".ruff_cache")  # fmt: skip
# The installed package must be found without the source tree on the path.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def make_env(root: Path) -> Path:
    """A venv whose own site-packages comes first, then this interpreter's (dependencies only)."""
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(purelib) / "parent_env.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.mark.slow  # builds a wheel and runs the reduced demo: 1-3 minutes on 2 cores
def test_wheel_install_runs_the_demo_from_another_folder(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=IGNORED)
    python = make_env(tmp_path / "env")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", str(source)], check=True, timeout=600)  # fmt: skip

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = "import importlib.util, smallthinker; print(smallthinker.__file__, importlib.util.find_spec('scripts'))"
    where = subprocess.run([python, "-c", probe], cwd=elsewhere, env=ENV, capture_output=True, text=True,
                           check=True)  # fmt: skip
    installed, scripts_spec = where.stdout.split()
    assert str(tmp_path / "env") in installed and scripts_spec == "None"
    # The native kernels' source ships with the package (it is compiled where it runs).
    kernels = Path(installed).parent / "inference" / "kernels"
    assert all((kernels / name).is_file() for name in ("gemv.cpp", "decoder.cpp", "simd.h"))

    command = tmp_path / "env" / "bin" / "smallthinker"
    demo = subprocess.run([str(command), "demo", "--reduced", "--out", "demo"], cwd=elsewhere, env=ENV,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-4000:]
    assert "Traceback" not in demo.stderr
    summary = json.loads((elsewhere / "demo" / "summary.json").read_text())
    assert summary["numbers"]["pretrain_loss"][1] < summary["numbers"]["pretrain_loss"][0]
    assert (elsewhere / "data" / "generated" / "synthetic" / "manifest.json").is_file()
