"""Pretraining (both ONE-PEACE tasks, both stages). Import the submodules you need:
`onepeace.train.loop.Trainer`, `onepeace.train.config.TrainConfig`, `onepeace.train.objectives`,
`onepeace.train.task.PretrainTask` (model + stage objective: the module DDP / FSDP wrap)."""
