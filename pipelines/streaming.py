"""Ray Datasets from a dataset manifest: stream Parquet shards through the tokenizer.

Nothing here materializes a split: `read_parquet` -> `map_batches(TokenizeBatch)`
are lazy, and the trainer pulls blocks as it consumes them.

Resource sizing matters on small machines: Ray Data's read and map tasks reserve a
whole CPU each by default, and next to a Ray Train worker that holds a CPU, a
2-core machine then waits forever ("backpressured: tasks(ResourceBudget)").
`DataResources` gives every data operator a fractional CPU so that the default run
fits next to the training workers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import ray
from ray.data import ActorPoolStrategy, DataContext

from pipelines.datasets import Manifest
from pipelines.tokenization import GroupByLength, TokenizeBatch, TokenizerSettings

TEXT_COLUMNS = ["text", "label"]


@dataclass(frozen=True)
class DataResources:
    """What the data pipeline reserves per operator (Ray logical CPUs)."""

    read_cpus: float = 0.1  # Parquet decoding is light; a fraction keeps it schedulable
    tokenize_cpus: float = 0.25
    tokenizer_actors_min: int = 1
    tokenizer_actors_max: int = 2
    tokenize_batch_size: int = 256  # rows per tokenizer call: amortizes Python overhead

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_cluster(cls, cpus_free_for_data: float) -> "DataResources":
        """Scale tokenizer actors with the CPUs that training leaves over."""
        if cpus_free_for_data >= 4:
            return cls(read_cpus=0.5, tokenize_cpus=1.0, tokenizer_actors_min=1, tokenizer_actors_max=max(1, int(cpus_free_for_data // 2)))
        return cls()


@contextmanager
def _file_list_reader():
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
    with _file_list_reader():
        return ray.data.read_parquet(
            paths,
            filesystem=manifest.filesystem,
            columns=TEXT_COLUMNS,
            num_cpus=resources.read_cpus,
            # one block per shard: shards are already sized for streaming
            override_num_blocks=len(paths),
        )


def tokenize(
    dataset: ray.data.Dataset,
    tokenizer: TokenizerSettings,
    resources: DataResources = DataResources(),
) -> ray.data.Dataset:
    """{"text", "label"} -> {"input_ids" (ragged), "length", "label"}, in tokenizer actors."""
    return dataset.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={"settings": tokenizer.as_dict()},
        batch_size=resources.tokenize_batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=resources.tokenizer_actors_min, max_size=resources.tokenizer_actors_max),
        num_cpus=resources.tokenize_cpus,
        udf_modifying_row_count=False,
    )


def group_by_length(dataset: ray.data.Dataset, batch_size: int, bucket_batches: int = 16, seed: int = 0) -> ray.data.Dataset:
    """Rows of similar length next to each other, in buckets of `bucket_batches` batches."""
    return dataset.map_batches(
        GroupByLength,
        fn_constructor_kwargs={"batch_size": batch_size, "seed": seed},
        batch_size=batch_size * bucket_batches,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=1),
        num_cpus=0.05,
        udf_modifying_row_count=False,
    )


def tokenized_splits(
    manifest: Manifest,
    tokenizer: TokenizerSettings,
    splits: tuple[str, ...] = ("train", "val", "test"),
    resources: DataResources = DataResources(),
    group_by_length_batch_size: int | None = None,
    seed: int = 0,
    cache: bool = False,
) -> dict[str, ray.data.Dataset]:
    """Tokenized Datasets per split, ready for `TorchTrainer(datasets=...)`.

    `group_by_length_batch_size`: the per-worker batch size, to group the train split
    by length (evaluation splits keep their order; their padding cost is small).
    `cache`: tokenize now and keep the token ids in the object store (in shard order).
    Otherwise every epoch reads and tokenizes again, and starts tokenizer actors again:
    seconds of idle accelerator per epoch. Length grouping stays lazy, so every epoch
    still gets its own batch order.
    """
    datasets = {}
    for split in splits:
        dataset = tokenize(read_split(manifest, split, resources), tokenizer, resources)
        if cache:
            dataset.context.execution_options.preserve_order = True
            dataset = dataset.materialize()
        if split == "train" and group_by_length_batch_size:
            dataset = group_by_length(dataset, group_by_length_batch_size, seed=seed)
        datasets[split] = dataset
    return datasets
