"""`python -m pipelines.prepare_imdb`: raw IMDB -> validated Parquet shards + manifest.

Examples:
    python -m pipelines.prepare_imdb                       # download the official tarball
    python -m pipelines.prepare_imdb --source sample       # offline: synthetic corpus
    python -m pipelines.prepare_imdb --source ~/aclImdb_v1.tar.gz --storage s3://bucket/platform

Bad input stops with one line, `error: WHERE: PROBLEM`, and exit status 2; nothing is written.
WHERE is the file (an archive member as ARCHIVE:MEMBER, a Parquet row as FILE#row=N, N
counted from 0 as in pandas and pyarrow).
"""

from __future__ import annotations

import argparse

from pipelines.core import cli
from pipelines.data.prepare import prepare_dataset
from pipelines.data.settings import PrepareConfig


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("python -m pipelines.prepare_imdb", __doc__, PrepareConfig)


def main(argv: list[str] | None = None) -> int:
    config = cli.from_namespace(PrepareConfig, build_parser().parse_args(argv))
    result = prepare_dataset(config)
    manifest = result.manifest
    state = "written" if result.created else "already prepared (no change; --force rebuilds)"
    print(f"{manifest.describe()}\n{state}")
    if manifest.source.get("kind") == "sample":
        print("note: the sample corpus is synthetic; accuracy on it says nothing about IMDB")
    for warning in manifest.warnings:
        print(f"warning: {warning}")
    print(f"manifest: {manifest.root.child('manifest.json').uri}")
    return 0


def cli_entry() -> None:
    cli.run_main(main)


if __name__ == "__main__":
    cli_entry()
