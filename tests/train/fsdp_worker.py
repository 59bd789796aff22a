"""Started by `accelerate launch`: restore a checkpoint into this launch's layout, write the restored
weights and optimizer state (gathered, keyed by parameter name) from rank 0, then train on with the
same config.

    accelerate launch --config_file configs/accelerate/fsdp2_cpu.yaml -m tests.train.fsdp_worker \
        RUN_CONFIG.yaml OUT.pt
"""

from __future__ import annotations

import sys

import torch

from smallthinker.train import distributed, loop
from smallthinker.train.config import load_train_config


def main(config_file: str, out_file: str) -> None:
    cfg = load_train_config(config_file)
    run = loop.setup(cfg)
    model_state = distributed.full_model_state(run.model)  # collectives: every rank takes part
    optimizer_state = distributed.full_optimizer_state(run.model, run.optimizer)
    if run.accelerator.is_main_process:
        restored = {"model": model_state, "optimizer": optimizer_state, "step": run.state.step}
        torch.save(restored | {"sharded": distributed.is_sharded(run.model)}, out_file)
    run.logger.close()
    loop.train(cfg)


if __name__ == "__main__":
    main(*sys.argv[1:])
