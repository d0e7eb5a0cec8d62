"""The object store failing under `prepare --force` and under the output commit of `predict --overwrite`.

A fault proxy (tests/fault_proxy.py) sits between the commands and a real S3-compatible server
(moto) and answers 503, holds a request past the client's timeout, or resets the connection,
on the calls of one step: a shard or part written, the manifest or `_SUCCESS`, `LATEST`, a
part moved in (a server-side copy), an old file deleted. A fault that hits once is retried
by the S3 client and the command succeeds. One that lasts ends `prepare` with one line and
exit 2, and the output commit with an error; either way a reader then finds a whole result,
the previous one or the new one, and a rerun once the store answers again completes.

Every case runs commands in processes of their own, each behind a proxy of its own: they
are one job of the lane beside the other tests (tests/lane.py), four at a time, as the S3
client's retries mostly wait.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines.data.sample_corpus import write_sample_corpus
from tests.fault_proxy import Fault, FaultProxy
from tests.lane import lane_result
from tests.scenarios.overwrite_steps import val_fraction_of
from tests.services import S3Server

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "tests" / "scenarios" / "overwrite_steps.py"
BUCKET = "faults"

# prepare --force of other content over version v1: the fault's request, and whether the
# new manifest is in place before that step (then the new version is what readers find)
PREPARE_STEPS = {
    "a shard": (Fault("PUT", "/train/part-", "503"), False),
    "the manifest": (Fault("PUT", "/manifest.json", "503"), False),
    "LATEST": (Fault("PUT", "/LATEST", "503"), True),
    "an old shard's delete": (Fault("DELETE", "/train/part-", "503"), True),
}
# the commit of a prediction output, the same way
COMMIT_STEPS = {
    "a staged part": (Fault("PUT", "/_temporary-", "503"), False),
    "a part moved in": (Fault("PUT", "/scored/part-", "503"), False),
    "_SUCCESS": (Fault("PUT", "/_SUCCESS", "503"), False),
    "an old part's delete": (Fault("DELETE", "/scored/part-", "503"), True),
}
LASTING = [("prepare", step, action) for step in PREPARE_STEPS for action in ("503", "reset")] + [
    ("commit", step, "503") for step in COMMIT_STEPS]
ONCE = ["503", "reset", "timeout"]


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)


def prepare(storage: str, corpus: Path, generation: int, env: dict) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pipelines.prepare_imdb", "--source", str(corpus), "--storage", storage, "--version", "v1",
                "--val-fraction", str(val_fraction_of(generation)), "--rows-per-shard", "40", "--force", "--no-progress",
                "--cache-dir", str(corpus.parent / "cache")], env)


def commit(output: str, generation: int, env: dict) -> subprocess.CompletedProcess:
    return run([sys.executable, str(SCENARIO), "predict", output, str(generation)], env)


def found(kind: str, where: str, env: dict) -> str:
    """The generation a reader finds there (read without the proxy), or 'error: ...'."""
    out = run([sys.executable, str(SCENARIO), f"found-{kind}", where], env).stdout
    return next((line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("FOUND ")), f"error: no answer {out[-300:]}")


def one_case(what: str, step: str, action: str, lasting: bool, s3: S3Server, corpus: Path, env: dict) -> dict:
    """Generation 1 whole; generation 2 with the fault; what a reader finds; generation 3 with the store back."""
    direct = {**env, **s3.env()}
    proxy = FaultProxy(s3.endpoint_url).start()
    through = {**direct, "AWS_ENDPOINT_URL": proxy.url}
    key = f"{what}-{step}-{action}-{'lasting' if lasting else 'once'}".replace(" ", "-").replace("'", "")
    try:
        if what == "prepare":
            where, kind = f"s3://{BUCKET}/{key}", "prepare"
            write = lambda generation: prepare(where, corpus, generation, through)  # noqa: E731
        else:
            where, kind = f"s3://{BUCKET}/{key}/scored", "predict"
            write = lambda generation: commit(where, generation, through)  # noqa: E731
        first = write(1)
        fault = (PREPARE_STEPS if what == "prepare" else COMMIT_STEPS)[step][0] if lasting else Fault("PUT", "/manifest.json", action)
        proxy.arm(Fault(fault.method, fault.path_part, action, times=None if lasting else 1, hang_s=5))
        faulty = write(2)
        fired = len(proxy.fired())
        proxy.clear()
        found_after_fault = found(kind, where, direct)
        again = write(3)
        return {"first_exit": first.returncode, "exit": faulty.returncode, "stderr": faulty.stderr[-3000:], "fired": fired,
                "found": found_after_fault, "again_exit": again.returncode, "found_again": found(kind, where, direct), "where": where}
    finally:
        proxy.stop()


def store_faults(workdir: Path, env: dict) -> dict:
    corpus = write_sample_corpus(workdir / "raw" / "aclImdb", train_per_label=40, test_per_label=20, seed=5)
    cases = [(what, step, action, True) for what, step, action in LASTING] + [("prepare", "the manifest", action, False) for action in ONCE]
    with S3Server(workdir / "s3") as s3:
        s3.create_bucket(BUCKET)
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {case: pool.submit(one_case, *case, s3, corpus, env) for case in cases}
            results = {}
            for (what, step, action, lasting), future in futures.items():
                try:
                    results[f"{what}|{step}|{action}|{lasting}"] = future.result()
                except Exception as exc:  # noqa: BLE001 - reported by the case's test
                    results[f"{what}|{step}|{action}|{lasting}"] = {"error": f"{type(exc).__name__}: {exc}"}
            return results


@pytest.mark.lane(store_faults, timeout_s=300, light=True)
@pytest.mark.parametrize(("what", "step", "action"), LASTING)
def test_a_lasting_store_fault_at_a_step_fails_the_command_and_leaves_a_whole_result(request, what, step, action):
    result = lane_result(request, store_faults)[f"{what}|{step}|{action}|True"]
    assert "error" not in result, result.get("error")
    assert result["first_exit"] == 0 and result["fired"] >= 1, result
    if what == "prepare":
        assert result["exit"] == 2, result["stderr"]
        errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and result["where"] in errors[0], result["stderr"]
        assert "Traceback" not in result["stderr"]
    else:
        assert result["exit"] != 0, result
    committed_before = (PREPARE_STEPS if what == "prepare" else COMMIT_STEPS)[step][1]
    assert result["found"] == ("2" if committed_before else "1"), result
    assert result["again_exit"] == 0 and result["found_again"] == "3", result


@pytest.mark.lane(store_faults, timeout_s=300, light=True)
@pytest.mark.parametrize("action", ONCE)
def test_a_store_fault_that_hits_once_is_retried_and_the_rebuild_succeeds(request, action):
    result = lane_result(request, store_faults)[f"prepare|the manifest|{action}|False"]
    assert "error" not in result, result.get("error")
    assert result["fired"] == 1 and result["exit"] == 0, result
    assert result["found"] == "2", result
