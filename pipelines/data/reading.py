"""Ray Datasets of a dataset version's Parquet shards, with fractional CPUs for every data operator.

Ray Data's read and map tasks reserve a whole CPU each by default, and next to a Ray
Train worker that holds a CPU, a 2-core machine then waits forever ("backpressured:
tasks(ResourceBudget)"). `DataResources` gives every data operator a fractional CPU so
that the default run fits next to the training workers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import ray
from ray.data import DataContext

from pipelines.core.errors import DataError
from pipelines.data.datasets import Manifest

TEXT_COLUMNS = ["text", "label"]


@dataclass(frozen=True)
class DataResources:
    """What the data pipeline reserves per operator (Ray logical CPUs)."""

    read_cpus: float = 0.1  # Parquet decoding is light; a fraction keeps it schedulable
    tokenize_cpus: float = 0.25
    tokenize_tasks_max: int = 2  # tokenizer tasks at once (each worker process keeps its tokenizer)
    tokenize_batch_size: int = 256  # rows per tokenizer call: amortizes Python overhead

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_cluster(cls, cpus_free_for_data: float) -> "DataResources":
        """Scale tokenizer tasks with the CPUs that training leaves over."""
        if cpus_free_for_data >= 4:
            return cls(read_cpus=0.5, tokenize_cpus=1.0, tokenize_tasks_max=max(1, int(cpus_free_for_data // 2)))
        return cls()


@contextmanager
def file_list_reader():
    """Read Parquet through Ray Data's V1 datasource, which takes the file list as given.

    ray 2.60's default V2 path adds a ListFiles operator whose tasks reserve a whole
    CPU regardless of `num_cpus`; next to a 1-CPU Train worker on 2 cores that task
    can never be scheduled and the run hangs. Our manifest already lists the files.
    """
    context = DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = previous


def read_split(manifest: Manifest, split: str, resources: DataResources = DataResources()) -> ray.data.Dataset:
    """The split's shards as a lazy Dataset of {"text", "label"} rows."""
    paths = manifest.split_uris(split)
    with file_list_reader():
        return ray.data.read_parquet(
            paths,
            filesystem=manifest.filesystem,
            columns=TEXT_COLUMNS,
            num_cpus=resources.read_cpus,
            # one block per shard: shards are already sized for streaming
            override_num_blocks=len(paths),
        )


def unreadable(exc: BaseException, manifest: Manifest, split: str) -> DataError | None:
    """A shard that cannot be read (damaged, not Parquet) as one line naming the split; None for other failures.

    Ray re-raises a task's error as a RayTaskError that is also an instance of the
    cause's class, so an OSError or ArrowException from a read task matches here.
    """
    import pyarrow as pa

    if not isinstance(exc, (OSError, pa.ArrowException)):
        return None
    cause = getattr(exc, "cause", None) or exc
    reason = " ".join(str(cause).split())[:300]
    return DataError(f"the {split} split cannot be read ({type(cause).__name__}: {reason}); prepare the dataset again", manifest.uri)
