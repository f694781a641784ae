"""Distill stage: Ray Train + DeepSpeed ZeRO, scale-wise DMD + MMD + GAN.

`run(cfg)` (trainer.py, the driver) starts a `TorchTrainer` whose workers each run
`train_loop_per_worker` (worker.py): build the networks and DeepSpeed engines (engines.py),
restore the latest checkpoint (checkpoint.py), then per step one `train_iteration`
(iteration.py) on the worker's own rows of the store (data.py), its metrics (progress.py), and
at checkpoints validation (validation.py) and the checkpoint; last, the export of the student
(export.py).
"""

from pipelines.stages.distill.trainer import run

__all__ = ["run"]
