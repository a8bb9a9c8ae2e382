"""Run under torchrun by tests/test_parallel_train.py: a GRPO run (nanoseek.train.grpo.train_grpo) with expert
parallelism, for a config the test passes as JSON (the CLI has no flag for every knob the test needs, e.g. a
micro-batch small enough that ranks run different numbers of passes).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/rl_ep_worker.py INIT OUT CFG_JSON EP R
"""
import json
import sys
from pathlib import Path

import torch

from nanoseek.train.grpo import GRPOConfig, train_grpo

if __name__ == "__main__":
    torch.set_num_threads(1)
    init, out, cfg, ep, redundant = sys.argv[1:6]
    train_grpo(Path(init), Path(out), GRPOConfig(**json.loads(cfg)), quiet=False, device="cpu", ep=int(ep),
               ep_redundant=int(redundant))
