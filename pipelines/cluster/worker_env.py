"""The environment every Ray worker gets: tokenizer threads off, no GPU for a worker that holds none, offline hub flags and object-store endpoints passed through, never credentials."""

from __future__ import annotations

import os

# Passed to every Ray worker: Rust tokenizers would otherwise start a thread pool
# per actor and oversubscribe the CPUs that Ray already divides between actors.
# Ray Train's print patch logs every print of a worker and prints it as well: each line
# reached the driver twice.
# A task or actor that asks for no GPU must see none: since Ray 2.4x a worker assigned zero
# GPUs keeps the node's CUDA_VISIBLE_DEVICES (ray/_private/accelerators/accelerator.py, issue
# ray-project/ray#54868; ray/_private/utils.py set_visible_accelerator_ids skips zero), so a
# CPU Serve replica or batch actor on a GPU node would put ONNX Runtime's CUDA provider, or
# torch, on a GPU a training worker holds. RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1 is Ray's switch
# back to setting it to "" for them.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}
# Passed through when set on the driver, so offline runs stay offline on workers.
PASSTHROUGH_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "MLFLOW_TRACKING_URI",
    "PLATFORM_STORAGE",
    "PLATFORM_FAIL_AT_EPOCH",  # fault-injection switch used by the tests
    # OpenMP's spin-wait: PASSIVE where a node's cores are shared with other work
    # (bench/omp_wait_policy.py, docs/benchmarks.md)
    "OMP_WAIT_POLICY",
    # where the object store is; never the credentials: a runtime environment is shown
    # in the dashboard, and every node has its own (instance profile, env, secret)
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EC2_METADATA_DISABLED",
    "MLFLOW_S3_ENDPOINT_URL",
)


def worker_env() -> dict[str, str]:
    from pipelines.core.tracking_env import users_tracking_uri

    env = dict(WORKER_ENV)
    env.update({name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ})
    if not users_tracking_uri():
        # only MLflow's export for an earlier run in this process: workers would take it
        # for the user's store in every later run (pipelines.tracking.runs)
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


def hide_gpus_unless_assigned() -> None:
    """In a Ray actor that holds no GPU: CUDA_VISIBLE_DEVICES="" before torch or ONNX Runtime start CUDA.

    For actors that may run without this module's WORKER_ENV (a Serve replica that `serve deploy`
    started from a config file); a no-op outside an actor and in one that holds a GPU.
    """
    import ray

    if not ray.is_initialized():
        return
    context = ray.get_runtime_context()
    if context.get_actor_id() is not None and not context.get_accelerator_ids().get("GPU"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
