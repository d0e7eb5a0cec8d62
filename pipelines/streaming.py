"""Ray Datasets from a dataset manifest: stream Parquet shards through the tokenizer.

Nothing here materializes a split: `read_parquet` -> `map_batches(tokenize_batch)`
are lazy, and the trainer pulls blocks as it consumes them.

Resource sizing matters on small machines: Ray Data's read and map tasks reserve a
whole CPU each by default, and next to a Ray Train worker that holds a CPU, a
2-core machine then waits forever ("backpressured: tasks(ResourceBudget)").
`DataResources` gives every data operator a fractional CPU so that the default run
fits next to the training workers.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import ray
from ray.data import DataContext, TaskPoolStrategy
from ray.train import DataConfig

from pipelines import console
from pipelines.config import TrainConfig
from pipelines.datasets import Manifest
from pipelines.errors import DataError
from pipelines.tokenization import TokenizerSettings, rust_tokenizer_agrees, tokenize_batch

log = logging.getLogger(__name__)
TEXT_COLUMNS = ["text", "label"]
# --cache-tokenized auto: cache when the token ids fill under this share of the object store
CACHE_STORE_FRACTION = 0.10
# bytes per token in the object store: int32 ids plus Arrow offsets and block overhead
CACHE_BYTES_PER_TOKEN = 6


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


def tokenize(
    dataset: ray.data.Dataset,
    tokenizer: TokenizerSettings,
    resources: DataResources = DataResources(),
    rust: bool | None = None,
) -> ray.data.Dataset:
    """{"text", "label"} -> {"input_ids" (ragged), "length", "label"}, in tokenizer tasks.

    `rust`: whether the tasks load tokenizer.json alone (`rust_tokenizer_agrees`); None
    checks it here, in the calling process, once per model.
    """
    if rust is None:
        rust = rust_tokenizer_agrees(tokenizer.model_name_or_path)
    return dataset.map_batches(
        tokenize_batch,
        fn_kwargs={"settings": tokenizer.as_dict(), "rust": rust},
        batch_size=resources.tokenize_batch_size,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=resources.tokenize_tasks_max),
        num_cpus=resources.tokenize_cpus,
        udf_modifying_row_count=False,
    )


def tokenized_splits(
    manifest: Manifest,
    tokenizer: TokenizerSettings,
    splits: tuple[str, ...] = ("train", "val", "test"),
    resources: DataResources = DataResources(),
    cache: bool = False,
    rust: bool | None = None,
) -> dict[str, ray.data.Dataset]:
    """Tokenized Datasets per split, ready for `TorchTrainer(datasets=...)`.

    `cache`: tokenize now and keep the token ids in the object store (in shard order).
    Otherwise every epoch reads and tokenizes again. The order within an epoch is the training
    worker's business (pipelines.batching), so a cached split still gets a new one
    every epoch.
    """
    datasets = {}
    for split in splits:
        try:
            dataset = tokenize(read_split(manifest, split, resources), tokenizer, resources, rust)
            if cache:
                dataset.context.execution_options.preserve_order = True
                dataset = materialize_with_progress(dataset, manifest.splits[split].rows, f"tokenize {split}")
        except Exception as exc:
            raise unreadable(exc, manifest, split) or exc
        datasets[split] = dataset
    return datasets


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


def should_cache_tokenized(config: TrainConfig, manifest: Manifest, alive_nodes: int, object_store_bytes: float) -> bool:
    """--cache-tokenized: yes, no, or auto (one node, and the token ids fit easily)."""
    if config.cache_tokenized != "auto":
        if config.cache_tokenized == "yes" and alive_nodes > 1:
            console.warn("--cache-tokenized yes on a multi-node cluster: a node lost mid-run takes its cached blocks "
                         "with it and the run cannot resume (use auto or no to stream instead)")
        return config.cache_tokenized == "yes"
    if alive_nodes > 1:
        # cached blocks live in the object store of the node that made them; when that node
        # is lost, Ray Data cannot rebuild them (seen in the cluster rehearsal: restarted
        # workers fail with ReferenceCountingAssertionError), so a cluster streams instead
        return False
    rows = sum(info.rows for info in manifest.splits.values())
    needed = rows * config.max_length * CACHE_BYTES_PER_TOKEN  # an upper bound: most reviews are shorter
    return needed < CACHE_STORE_FRACTION * object_store_bytes


def materialize_with_progress(dataset: ray.data.Dataset, rows: int, desc: str) -> ray.data.Dataset:
    """`dataset.materialize()`, with a progress bar of rows on the console.

    Ray Data's own bars draw one line per operator and redraw into log files; this is
    the same steps as `Dataset.materialize` in Ray 2.60 (its internal classes), with the
    rows counted as the blocks come out.
    """
    from ray.data._internal.execution.interfaces import RefBundle
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.input_data_operator import InputData
    from ray.data.dataset import Dataset, MaterializedDataset

    from pipelines import console

    copy = Dataset.copy(dataset, _deep_copy=True, _as=MaterializedDataset)
    bundles = []
    with console.progress(rows, desc, unit="reviews") as progress:
        for bundle in copy.iter_internal_ref_bundles():
            # one bundle per block that does not own it: consumers must not free cached blocks
            bundles += [RefBundle(blocks=(block,), schema=bundle.schema, owns_blocks=False) for block in bundle.blocks]
            progress.update(bundle.num_rows() or 0)
    output = MaterializedDataset(LogicalPlan(InputData(input_data=bundles), dataset.context), copy.context, copy._raw_stats())
    output._execute()
    return output


def training_datasets(manifest: Manifest, model_path: str, config: TrainConfig, resources: DataResources, cache: bool, rust: bool | None = None) -> dict:
    """The tokenized train/val/test Datasets a run (or a Tune trial) trains on."""
    settings = TokenizerSettings(model_path, config.max_length, config.truncation)
    return tokenized_splits(manifest, settings, resources=resources, cache=cache, rust=rust)


class EvalSplitDataConfig(DataConfig):
    """Shard train equally (DDP steps stay in lockstep), and val/test without dropping rows.

    `streaming_split(equal=True)` may drop up to world_size-1 rows to even out the
    shards; for evaluation every row must count once, so those splits use equal=False
    and the loop sums counts over workers.

    `preserve_order`: rows reach the workers in the order of the shards, not in the
    order blocks happen to finish; a rerun (or the same trial in two sweeps) then sees
    the same windows, and so the same batches. With several workers, which worker
    gets which block still depends on timing.
    """

    def __init__(self, preserve_order: bool = True):
        super().__init__()
        self.preserve_order = preserve_order

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            options = self._resolve_execution_options(name)
            options.preserve_order = options.preserve_order or self.preserve_order
            dataset.context.execution_options = options
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=(name == "train"), locality_hints=worker_node_ids)):
                output[rank][name] = split
        return output
