"""Ray Tune: sweeps of learning rate and batch size over the training worker, every trial an MLflow run, the winner registered and gated."""
