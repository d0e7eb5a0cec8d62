"""OpenMP's wait policy for torch on CPU, alone and beside a busy process, side by side.

    python bench/omp_wait_policy.py [--model tiny|minilm] [--threads 2] [--steps 8] [--rounds 3]

Each measurement is a fresh process (OpenMP reads OMP_WAIT_POLICY once, when torch loads it)
that times training steps (forward, backward, AdamW) of batch 16 x 64 tokens on `--threads`
threads. Measured twice: on an otherwise idle machine, then beside one process that keeps a
core busy (what a Ray node is when a training worker shares it with Ray Data's tasks, another
trial, or the test suite's second lane). Prints ms per step (median of the rounds) per policy
and the ratios; the verdict line is what tests/conftest.py and pipelines/cluster/worker_env.py
rely on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("default", "PASSIVE")  # default: OMP_WAIT_POLICY unset (libgomp spins a while, then sleeps)

STEPS = """
import sys, tempfile, time
import torch
from transformers import AutoModelForSequenceClassification
model_name, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
if model_name == "tiny":
    from tests.tiny_model import build_tiny_model
    path = build_tiny_model(tempfile.mkdtemp())
else:
    from pipelines.text.tokenization import default_model_path
    path = default_model_path()
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
ids = torch.randint(1000, 20000, (16, 64))
labels = torch.randint(0, 2, (16,))
def step():
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
step()
started = time.perf_counter()
for _ in range(steps):
    step()
print((time.perf_counter() - started) / steps * 1000)
"""


def ms_per_step(policy: str, args: argparse.Namespace) -> float:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", STEPS, args.model, str(args.threads), str(args.steps)], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Median ms per step per policy, the policies alternating round by round."""
    times: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    for _ in range(args.rounds):
        for policy in POLICIES:
            times[policy].append(ms_per_step(policy, args))
    return {policy: statistics.median(values) for policy, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "minilm"), default="minilm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    idle = measure(args)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        shared = measure(args)
    finally:
        spinner.kill()
        spinner.wait()
    print(f"{args.model}, {args.threads} threads, ms per training step (median of {args.rounds})")
    print(f"{'':>22} {'default':>8} {'PASSIVE':>8} {'PASSIVE/default':>16}")
    for name, row in (("idle machine", idle), ("one core kept busy", shared)):
        print(f"{name:>22} {row['default']:8.0f} {row['PASSIVE']:8.0f} {row['PASSIVE'] / row['default']:16.2f}")
    print(f"passive_cost_idle={idle['PASSIVE'] / idle['default']:.3f}  default_cost_shared={shared['default'] / shared['PASSIVE']:.3f}")


if __name__ == "__main__":
    main()
