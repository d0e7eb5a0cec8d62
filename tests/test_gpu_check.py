"""bench/gpu_check.py runs where a lent GPU machine runs it: without Ray or MLflow importable.

Here on a CPU, with the suite's tiny BERT: every section runs (device and precision, a
one-process gloo group, the training step through DDP, inference on each backend) and
reports figures. On a GPU the same script picks NCCL, bf16 or fp16, and the CUDA devices.
It is a command in a process of its own: a job of the lane beside the other tests (tests/lane.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.lane import lane_result, run_process
from tests.tiny_model import build_in_subprocess

REPO = Path(__file__).resolve().parents[1]
BLOCK_RAY_AND_MLFLOW = '''
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow"):
            raise ImportError(f"{name} is not installed on the GPU check's machine")
        return None
sys.meta_path.insert(0, Block())
'''


def gpu_check_on_cpu(workdir: Path, env: dict) -> dict:
    model, _, _ = build_in_subprocess(workdir, env)
    (workdir / "site").mkdir()
    (workdir / "site" / "sitecustomize.py").write_text(BLOCK_RAY_AND_MLFLOW)
    out = workdir / "gpu_check.json"
    command = [sys.executable, "bench/gpu_check.py", "--model", model, "--steps", "3", "--batch-size", "4", "--max-length", "32",
               "--texts", "8", "--rounds", "8", "--out", str(out)]
    code, output = run_process(command, {**env, "PYTHONPATH": str(workdir / "site")}, workdir / "gpu_check.log", timeout_s=240)
    return {"returncode": code, "output": output[-4000:], "found": json.loads(out.read_text()) if out.exists() else {}}


@pytest.mark.lane(gpu_check_on_cpu, timeout_s=300, light=True)
def test_the_gpu_check_runs_without_ray_or_mlflow_and_reports_every_section(request):
    result = lane_result(request, gpu_check_on_cpu)
    assert result["returncode"] == 0, result["output"]
    found = result["found"]
    assert (found["device"], found["precision"], found["dist_backend"], found["dist_all_reduce_ok"]) == ("cpu", "fp32", "gloo", True)
    assert found["train_samples_per_s"] > 0 and 0 < found["train_step_compute_share"] <= 1
    for backend in ("torch", "onnx", "onnx_int8"):
        assert found[f"infer_{backend}_device"] == "cpu"
        assert found[f"infer_{backend}_texts_per_s"] > 0
        assert 0 < found[f"infer_{backend}_p50_ms_batch1"] <= found[f"infer_{backend}_p99_ms_batch1"]
    assert "precision=fp32" in result["output"] and "infer_onnx_int8_texts_per_s=" in result["output"]
