"""MLflow: where the store is, the run's lifecycle, the registry and its champion gate, reports, the Ray Train callback (the only module here that imports ray.train)."""
