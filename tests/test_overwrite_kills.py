"""`prepare --force` and `predict --overwrite`, killed (`kill -9`) at each of their steps, on local disk and S3.

Each run replaces what the last one committed with other content (tests/scenarios/overwrite_steps.py):
a dataset version rebuilt with another validation fraction, or a prediction output with another
`generation`. After a kill at any step, what readers find must be whole: the previous content
or the new one, never a mix, never a manifest or `_SUCCESS` naming a missing file, and `LATEST`
on a readable version. A run to the end afterwards leaves nothing but what it commits.

Every step is a process of its own, so the four cases are one job of the lane beside the
other tests (tests/lane.py), in its light slot.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines.data.sample_corpus import write_sample_corpus
from tests.lane import lane_result
from tests.services import S3Server

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "tests" / "scenarios" / "overwrite_steps.py"
CASES = ("prepare-local", "prepare-s3", "predict-local", "predict-s3")


def scenario(args: list[str], env: dict, kill_at: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCENARIO), *args, *([str(kill_at)] if kill_at else [])]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)


def steps_of(result: subprocess.CompletedProcess) -> int:
    if result.returncode != 0 or "STEPS" not in result.stdout:
        raise AssertionError(f"a run to the end failed ({result.returncode}): {result.stderr[-2000:]}")
    return int(result.stdout.split("STEPS")[1])


def found(kind: str, where: str, env: dict) -> tuple[str, int]:
    """(the generation a reader finds, or 'error: ...'; files not listed by the manifest or _SUCCESS)"""
    out = scenario([f"found-{kind}", where], env).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    return lines.get("FOUND", f"error: no answer ({out[-500:]})"), int(lines.get("UNLISTED", -1))


def kill_at_every_step(kind: str, args_for, where: str, env: dict, period: int) -> dict:
    """For each step N: generation g written whole, then g+1 killed right before step N; what a reader found after."""
    outcomes, generation, steps, step = [], 0, None, 1
    while steps is None or step <= steps:
        generation += 1
        whole = steps_of(scenario(args_for(generation), env))
        steps = whole if steps is None else steps  # from a whole result without leftovers: the same steps each time
        killed = scenario(args_for(generation + 1), env, kill_at=step)
        generation_found, _ = found(kind, where, env)
        outcomes.append({"step": step, "exit": killed.returncode, "found": generation_found,
                         "previous": str(generation % period), "new": str((generation + 1) % period)})
        generation += 1
        step += 1
    generation += 1
    steps_of(scenario(args_for(generation), env))
    final, unlisted = found(kind, where, env)
    return {"steps": steps, "outcomes": outcomes, "final": final, "expected_final": str(generation % period), "unlisted": unlisted}


def run_case(case: str, workdir: Path, env: dict, s3: S3Server, corpus: Path) -> dict:
    kind, storage = case.split("-")
    if storage == "local":
        root, case_env = str(workdir / case), env
    else:
        root, case_env = f"s3://kills/{case}", {**env, **s3.env()}
    if kind == "prepare":
        return kill_at_every_step(kind, lambda g: ["prepare", root, str(corpus), str(g)], root, case_env, period=20)
    output = f"{root}/scored"
    return kill_at_every_step(kind, lambda g: ["predict", output, str(g)], output, case_env, period=10**6)


def kills_at_every_step(workdir: Path, env: dict) -> dict:
    corpus = write_sample_corpus(workdir / "raw" / "aclImdb", train_per_label=40, test_per_label=20, seed=5)
    with S3Server(workdir / "s3") as s3:
        s3.create_bucket("kills")
        with ThreadPoolExecutor(max_workers=1) as pool:  # one at a time: it runs beside the suite and the heavy lane
            futures = {case: pool.submit(run_case, case, workdir, env, s3, corpus) for case in CASES}
            results = {}
            for case, future in futures.items():
                try:
                    results[case] = future.result()
                except Exception as exc:  # noqa: BLE001 - reported by the case's test
                    results[case] = {"error": f"{type(exc).__name__}: {exc}"}
            return results


@pytest.mark.lane(kills_at_every_step, timeout_s=300, light=True)
@pytest.mark.parametrize("case", CASES)
def test_killed_at_any_step_a_reader_finds_the_previous_result_or_the_new_one_whole(request, case):
    result = lane_result(request, kills_at_every_step)[case]
    assert "error" not in result, result.get("error")
    assert result["steps"] >= 6, result
    for outcome in result["outcomes"]:
        assert outcome["exit"] == -9, f"step {outcome['step']}: the run was not killed there ({outcome})"
        assert outcome["found"] in (outcome["previous"], outcome["new"]), f"killed right before step {outcome['step']} of {result['steps']}: {outcome}"
    seen = {"previous" if o["found"] == o["previous"] else "new" for o in result["outcomes"]}
    assert seen == {"previous", "new"}, "the kills did not fall both before and after the commit"
    assert result["final"] == result["expected_final"], result
    assert result["unlisted"] == 0, "a run to the end left files of earlier or killed runs"
