"""The platform's library, in layers; the entry points users type sit at the top.

    prepare_imdb, train_imdb, predict, evaluate   entry points: parse, call, exit code
    training/   the training job and everything Ray Train runs
    inference/  the classifier's backends, their export, batch prediction
    tracking/   MLflow: the store, runs, the registry and its gate, reports
    data/       raw corpus -> validated, cleaned, split, versioned Parquet shards
    text/       the preprocessing and the model that training and every consumer share
    cluster/    Ray start-up, workers' environments, autoscaler requests
    core/       errors, storage, console, typed settings -> flags

Imports point down this list (docs/architecture.md); tests/test_platform_layout.py holds them there.
"""
