"""Optional experiment tracking (``--report_to tensorboard|wandb``): the training records also go to TensorBoard
(``<output_dir>/tensorboard``) or Weights & Biases. The library is imported only when asked for; a missing one is a
clear error, not a traceback."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import UserError


class Tracker:
    def __init__(self, kind: str, run_dir: str | Path, config: dict[str, Any], active: bool = True):
        self.kind = kind if active else "none"
        self.writer = None
        if self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--report_to tensorboard needs the tensorboard package (pip install tensorboard)"
                                ) from None
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        elif self.kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise UserError("--report_to wandb needs the wandb package (pip install wandb) and a login") from None
            self.writer = wandb.init(project="busdiff", dir=str(run_dir), config=config, name=Path(run_dir).name,
                                     resume="allow")

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.kind == "tensorboard":
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        else:
            self.writer.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            (self.writer.close if self.kind == "tensorboard" else self.writer.finish)()
