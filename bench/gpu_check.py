"""The GPU paths, timed bare: the training step and inference per backend, without Ray or MLflow.

    python bench/gpu_check.py [--model PATH] [--steps 30] [--batch-size 32] [--max-length 128]
                              [--texts 256] [--rounds 64] [--out gpu_check.json]

A machine lent for a GPU check has torch, transformers, onnxruntime and pyarrow, not Ray or
MLflow: this runs the platform's own step code (pipelines.training.loop, the code that the
Ray Train workers run) and its inference code (pipelines.inference.classifier, what Serve
replicas and batch prediction run) on whatever device torch sees, and prints what it found
as `key=value` lines (and, with --out, as JSON):

- the device, and the precision the platform picks there (`precision_for`: bf16 from compute
  capability 8.0, fp16 with a gradient scaler below, fp32 on CPU);
- distributed: a one-process group (NCCL on a GPU, gloo on a CPU) and an all-reduce, then the
  training steps run through DistributedDataParallel as a Ray Train worker's do;
- training: samples/s after warm-up, the share of the wall time the step computed (not
  waiting on its batches: they come ready here, so a low share means the step itself stalls),
  and the GPU's own busy share from NVML where torch can read it (`torch.cuda.utilization`);
  peak GPU memory;
- inference per backend (torch; onnx and onnx-int8 where the `onnx` exporter is installed):
  texts/s at batch 32, p50 and p99 milliseconds at batch 1 and at batch 32, and the device
  the backend actually ran on (ONNX Runtime's CUDA provider only where installed; int8 is a
  CPU backend).

--model: a Hugging Face model folder (default: the bundled MiniLM; a small random BERT
built here when that package is missing too). Texts are synthetic reviews of review length.
The suite runs it on a CPU with Ray and MLflow made unimportable (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

WORDS = ("a moving story with wonderful acting and a dull predictable plot that runs far too long "
         "the ending is awful but the score is great and the cast does what it can with it").split()


def say(key: str, value) -> None:
    print(f"{key}={value}", flush=True)


def default_model() -> str:
    """The bundled MiniLM, else a small random BERT saved here (its figures time the code, not a real model)."""
    try:
        from pipelines.text.tokenization import default_model_path

        return default_model_path()
    except Exception:  # noqa: BLE001 - the package is not installed on this machine
        return build_small_bert(Path(tempfile.mkdtemp(prefix="gpu-check-bert-")))


def build_small_bert(folder: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                        max_position_embeddings=512, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def review_texts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(120, 320)))) for _ in range(count)]


def describe_device(device: torch.device) -> dict:
    from pipelines.training.loop import precision_for

    found = {"device": str(device), "precision": precision_for(device), "torch": torch.__version__}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        found.update(gpu=torch.cuda.get_device_name(device), capability=f"{major}.{minor}",
                     bf16_reported=torch.cuda.is_bf16_supported(), gpu_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1))
    return found


def process_group(device: torch.device) -> dict:
    """A group of one (NCCL on a GPU, gloo on a CPU), as Ray Train sets up per worker; an all-reduce through it."""
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    start = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    value = torch.ones(4, device=device)
    dist.all_reduce(value)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"dist_backend": backend, "dist_all_reduce_ok": bool(value.sum().item() == 4.0), "dist_init_s": round(time.perf_counter() - start, 2)}


class UtilizationSampler:
    """The GPU's busy share from NVML, sampled every 0.1 s (None where torch cannot read it: no pynvml, or a CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self._stop = device, [], threading.Event()
        self.readable = False
        if device.type == "cuda":
            try:
                torch.cuda.utilization(device)
                self.readable = True
            except Exception:  # noqa: BLE001 - pynvml missing or NVML unavailable
                pass

    def __enter__(self):
        if self.readable:
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(torch.cuda.utilization(self.device))

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def mean(self) -> float | None:
        return round(statistics.fmean(self.samples) / 100, 3) if self.samples else None


def tokenized_steps(tokenizer, texts: list[str], batch_size: int, max_length: int, steps: int):
    """`steps` optimizer steps of one micro-batch each, in the loop's numpy batch format."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    rows = [np.asarray(row, dtype=np.int64) for row in ids]
    labels = np.arange(len(rows)) % 2
    for step in range(steps):
        pick = [(step * batch_size + i) % len(rows) for i in range(batch_size)]
        batch_ids = np.empty(batch_size, dtype=object)
        batch_ids[:] = [rows[i] for i in pick]
        yield [{"input_ids": batch_ids, "label": labels[pick]}]


def train(model_path: str, device: torch.device, steps: int, batch_size: int, max_length: int) -> dict:
    """The platform's training step (train_epoch: autocast, fp16's scaler, clipping, AdamW) through DDP, timed after warm-up."""
    from torch.nn.parallel import DistributedDataParallel

    from pipelines.text.model import load_classifier
    from pipelines.text.tokenization import load_tokenizer
    from pipelines.training.loop import build_optimizer, build_scheduler, grad_scaler_for, train_epoch

    tokenizer = load_tokenizer(model_path)
    model = load_classifier(model_path).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
    warmup = max(2, steps // 5)
    config = {"batch_size": batch_size, "grad_accum": 1, "train_rows": batch_size * (steps + warmup), "epochs": 1, "warmup_ratio": 0.1,
              "max_grad_norm": 1.0, "pad_token_id": tokenizer.pad_token_id or 0, "max_length": max_length}
    optimizer = build_optimizer(ddp, 2e-5, 0.01)
    scheduler = build_scheduler(optimizer, config, 1)
    scaler = grad_scaler_for(device)
    texts = review_texts(max(batch_size * 4, 64))
    train_epoch(ddp, optimizer, scheduler, tokenized_steps(tokenizer, texts, batch_size, max_length, warmup), config, device, scaler=scaler)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with UtilizationSampler(device) as utilization:
        start = time.perf_counter()
        totals = train_epoch(ddp, optimizer, scheduler, tokenized_steps(tokenizer, texts, batch_size, max_length, steps), config, device,
                             scaler=scaler)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    found = {"train_samples_per_s": round(totals.samples / wall, 1), "train_step_compute_share": round(totals.compute_s / wall, 3),
             "train_gpu_busy_share": utilization.mean(), "train_loss": round(totals.loss_sum / max(1, totals.samples), 4),
             "train_padding_share": round(1 - totals.real_tokens / max(1, totals.padded_tokens), 3)}
    if device.type == "cuda":
        found["train_peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return found


def model_folder(model_path: str, max_length: int, folder: Path) -> tuple[Path, dict]:
    """The registered model folder's layout (hf/, inference.json, model.onnx, model.int8.onnx); what could not be built, and why."""
    from pipelines.inference.classifier import InferenceSettings
    from pipelines.text.model import load_classifier
    from pipelines.text.tokenization import load_tokenizer

    tokenizer, model = load_tokenizer(model_path), load_classifier(model_path)
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    InferenceSettings(max_length=max_length, truncation="head_tail").save(folder)
    skipped = {}
    try:
        from pipelines.inference.export import export_onnx, quantize_int8

        export_onnx(model, tokenizer, folder / "model.onnx")
        quantize_int8(folder / "model.onnx", folder / "model.int8.onnx")
    except Exception as exc:  # noqa: BLE001 - no `onnx`/`onnxscript` on this machine: torch alone is still timed
        skipped = {backend: f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}" for backend in ("onnx", "onnx-int8")}
    return folder, skipped


def latencies_ms(classifier, texts: list[str], batch: int, rounds: int) -> list[float]:
    out = []
    for i in range(rounds):
        chunk = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
        start = time.perf_counter()
        classifier.probabilities(chunk)
        out.append((time.perf_counter() - start) * 1000)
    return out


def infer(folder: Path, backends: list[str], device: torch.device, texts: list[str], rounds: int) -> dict:
    from pipelines.inference.classifier import load_classifier_from

    found = {}
    for backend in backends:
        classifier = load_classifier_from(folder, backend, device=device if backend == "torch" else None)
        latencies_ms(classifier, texts, 32, 2)  # warm-up: kernels, allocator, ORT's first run
        one, many = latencies_ms(classifier, texts, 1, rounds), latencies_ms(classifier, texts, 32, max(4, len(texts) // 32))
        key = backend.replace("-", "_")
        found.update({f"infer_{key}_device": classifier.backend.device,
                      f"infer_{key}_texts_per_s": round(32 / (statistics.fmean(many) / 1000), 1),
                      f"infer_{key}_p50_ms_batch1": round(statistics.median(one), 2),
                      f"infer_{key}_p99_ms_batch1": round(float(np.percentile(one, 99)), 2),
                      f"infer_{key}_p50_ms_batch32": round(statistics.median(many), 2),
                      f"infer_{key}_p99_ms_batch32": round(float(np.percentile(many, 99)), 2)})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face model folder (default: the bundled MiniLM)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps, after a warm-up of a fifth as many (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="training rows per step (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per review (default: %(default)s)")
    parser.add_argument("--texts", type=int, default=256, help="texts per inference measurement (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=64, help="single-text calls timed per backend (default: %(default)s)")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model_path = args.model or default_model()
    found = {"model": model_path, **describe_device(device)}
    found.update(process_group(device))
    found.update(train(model_path, device, args.steps, args.batch_size, args.max_length))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        folder, skipped = model_folder(model_path, args.max_length, Path(scratch))
        backends = [b for b in ("torch", "onnx", "onnx-int8") if b not in skipped]
        found.update(infer(folder, backends, device, review_texts(args.texts, seed=1), args.rounds))
        found.update({f"infer_{b.replace('-', '_')}_skipped": why for b, why in skipped.items()})
    for key, value in found.items():
        say(key, value)
    if args.out:
        Path(args.out).write_text(json.dumps(found, indent=2) + "\n")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
