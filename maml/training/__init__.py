"""Training around the meta-gradient (exported from `maml`):

- `fit`: `fit`, `Hook`, `StepInfo`, `Stop`, `FitResult`, `skipped_steps`, and the errors `Diverged`, `Interrupted`;
- `checkpoints`: `Checkpointer`, `save_checkpoint`, `load_checkpoint`, `latest_checkpoint`, `list_checkpoints`,
  `params_sha256`, `atomic_write_bytes`, and the errors `CheckpointError`, `CorruptCheckpoint`,
  `IncompatibleCheckpoint`, `CheckpointWriteError`;
- `loggers`: `AbstractLogger`, `ConsoleLogger`, `MultiLogger`, `WandbLogger`.
"""
