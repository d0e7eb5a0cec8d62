"""Ask the Ray autoscaler for GPU workers and wait until they have joined; or release them.

    python platform/cluster/scale_gpus.py 2          # 2 GPUs: starts g5 workers, waits (max 20 min)
    python platform/cluster/scale_gpus.py 0          # withdraw the request; idle workers stop
                                                     # after idle_timeout_minutes (cluster.yaml)

Why: cluster.yaml keeps 0 GPU workers while nothing runs, and `train_imdb --use-gpu yes`
checks the GPUs it needs before it starts (it does not wait for the autoscaler). Run this on
the head first (`ray exec cluster.yaml "python ~/imdb-platform/platform/cluster/scale_gpus.py 2"`).
The request stays until it is replaced: release it when the jobs are done.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gpus", type=int, help="GPUs to keep available (0 releases the request)")
    parser.add_argument("--cpus-per-gpu", type=int, default=1, help="CPUs requested beside each GPU (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=1200, help="how long to wait for the workers (default: %(default)s)")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: %(default)s, the cluster of this node)")
    args = parser.parse_args(argv)
    if args.gpus < 0:
        parser.error("gpus must be >= 0")

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=args.address, logging_level="WARNING")
    bundles = [{"GPU": 1, "CPU": args.cpus_per_gpu}] * args.gpus
    # replaces any earlier request of this cluster: [] withdraws it
    request_resources(bundles=bundles)
    if not args.gpus:
        print("GPU request withdrawn; idle GPU workers stop after the idle timeout", flush=True)
        return 0
    deadline = time.monotonic() + args.timeout_s
    while (available := ray.cluster_resources().get("GPU", 0)) < args.gpus:
        if time.monotonic() > deadline:
            print(f"only {available:g} of {args.gpus} GPUs after {args.timeout_s:.0f}s: check `ray status` and "
                  "the autoscaler log (`ray exec cluster.yaml 'tail -n 100 /tmp/ray/session_latest/logs/monitor.*'`)",
                  file=sys.stderr, flush=True)
            return 1
        print(f"waiting for GPU workers: {available:g}/{args.gpus}", flush=True)
        time.sleep(15)
    print(f"{ray.cluster_resources().get('GPU', 0):g} GPUs ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
