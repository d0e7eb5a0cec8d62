"""What a user runs on the head (`ray exec`) to try the endpoint there: prints one JSON line.

    python tests/scenarios/serve_client.py http://127.0.0.1:8000 [--wait-for-version N] [--timeout-s S]

Waits for /readyz, predicts two texts (until the answer comes from version N, when given: a
rollout that follows the alias), then sends one request the endpoint must refuse (an empty
list of texts), so that its error and rejection counters have a series. Standard library
only: it runs with whatever Python the head has.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

TEXTS = ["A moving story with wonderful acting.", "Dull, predictable and far too long."]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {"detail": error.read().decode(errors="replace")[:300]}


def ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/readyz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("--wait-for-version", type=int)
    parser.add_argument("--timeout-s", type=float, default=240)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout_s
    while not ready(args.base_url):
        if time.monotonic() > deadline:
            print(json.dumps({"error": f"{args.base_url}/readyz did not answer 200 in {args.timeout_s:.0f} s"}))
            return 1
        time.sleep(1)
    while True:
        status, answer = post(f"{args.base_url}/v1/predict", {"texts": TEXTS})
        versions = {str(p.get("model_version")) for p in answer.get("predictions", [])}
        if args.wait_for_version is None or versions == {str(args.wait_for_version)} or time.monotonic() > deadline:
            break
        time.sleep(1)
    refused_status, _ = post(f"{args.base_url}/v1/predict", {"texts": []})
    print(json.dumps({"status": status, "answer": answer, "refused_status": refused_status}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
