"""The training job: settings, the resource plan, the Ray Data feed, the per-worker loop and checkpoints, and `job.run_training` that ties them to MLflow."""
