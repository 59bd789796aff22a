"""Importing the package changes nothing process-wide: no transformers patch, no matplotlib backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import matplotlib
matplotlib.use("svg")
import torch
torch.set_num_threads(2)
from transformers.configuration_utils import PreTrainedConfig
before = PreTrainedConfig.__dict__["get_config_dict"]
import smallthinker.modeling, smallthinker.quickstart, smallthinker.train.loop, smallthinker.train.plots  # noqa
import smallthinker.eval, smallthinker.inference, smallthinker.chat, smallthinker.merge  # noqa
assert PreTrainedConfig.__dict__["get_config_dict"] is before, "transformers was patched"
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert torch.get_num_threads() == 2
print("unchanged")
"""


def test_imports_leave_global_state_alone():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "unchanged"


def test_plots_render_without_pyplot(tmp_path):
    import matplotlib

    from smallthinker.train.plots import subplots

    backend = matplotlib.get_backend()
    fig, ax = subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert matplotlib.get_backend() == backend
