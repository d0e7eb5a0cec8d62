"""Tokenized splits for the Train workers: Ray Data streams shards through the tokenizer.

Nothing here materializes a split unless the cache policy says so: `read_parquet` ->
`map_batches(tokenize_batch)` are lazy, and the trainer pulls blocks as it consumes
them. `EvalSplitDataConfig` shards train and hands every worker its part of val/test.
"""

from __future__ import annotations

import ray
from ray.data import TaskPoolStrategy
from ray.train import DataConfig

from pipelines.core import console
from pipelines.data.datasets import Manifest
from pipelines.data.reading import DataResources, read_split, unreadable
from pipelines.text.tokenization import TokenizerSettings, rust_tokenizer_agrees, tokenize_batch
from pipelines.training.settings import TrainConfig

# --cache-tokenized auto: cache when the token ids fill under this share of the object store
CACHE_STORE_FRACTION = 0.10
# bytes per token in the object store: int32 ids plus Arrow offsets and block overhead
CACHE_BYTES_PER_TOKEN = 6




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
    worker's business (pipelines.training.batching), so a cached split still gets a new one
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

    from pipelines.core import console

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
