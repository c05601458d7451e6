"""Pretraining (both ONE-PEACE tasks, both stages). Import the submodules you need:
`onepeace.train.loop.Trainer`, `onepeace.train.config.TrainConfig`, `onepeace.train.objectives`."""
