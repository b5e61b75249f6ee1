"""What tests/test_distributed.py starts under torchrun: a training script's `main`, with hooks.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_entry.py \
        train_supervised --config configs/tiny.yaml ...

Environment hooks:
- DUMP_DIR: at the end each rank saves its own networks (model, teacher, static_teacher) to
  DUMP_DIR/rank<r>.pt, so a test can compare what the processes hold (rank 0 alone writes the
  run's checkpoints).
- NAN_RANK: from its first step that rank records a NaN loss (the others stay finite).
- NO_BATCHNORM: BatchNorm2d layers become identities (SegFormer's decoder has one, whose batch
  statistics would otherwise depend on how a global batch is shared out on the CPU).
"""
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from utils import distributed  # noqa: E402
from utils.engine import TrainingRun  # noqa: E402
from utils.errors import run_cli  # noqa: E402

NETWORKS = ("model", "teacher", "static_teacher")

if os.environ.get("NO_BATCHNORM"):
    torch.nn.BatchNorm2d = torch.nn.Identity

if os.environ.get("DUMP_DIR"):
    finish = TrainingRun.finish

    def finish_and_dump(run):
        finish(run)
        torch.save({name: module.state_dict() for name, module in run.modules.items()
                    if name in NETWORKS},
                   Path(os.environ["DUMP_DIR"]) / f"rank{distributed.rank()}.pt")

    TrainingRun.finish = finish_and_dump

if os.environ.get("NAN_RANK") and int(os.environ["NAN_RANK"]) == distributed.rank():
    record = TrainingRun.record
    TrainingRun.record = lambda run, logs: record(run, {**logs, "loss": float("nan")})

script = importlib.import_module(sys.argv.pop(1))
run_cli(script.main)
