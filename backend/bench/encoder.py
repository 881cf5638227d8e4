"""`sam-backend bench encoder`: every installed model family and size side by side (random weights of
the real architectures: an encoder costs the same whatever its weights).

Per model: seconds per image of the encoder alone (median of --repeat, a 1 MP photo resized to the
model's input), its speed-up over vit_b as the median ratio of alternating encodes (vit_b's process
stays up and encodes just before each of the model's: a pair meets the same load on a shared
machine), peak RSS of a process that loads the model and encodes (its own process, so models
do not share a peak), the stored embedding (the cache entry exactly as Redis holds it), then warm
click p50 at 1 MP and 20 MP, brush and polygon, through the real HTTP stack (`bench click`'s
machinery: gunicorn + Redis + an image server). Clicks take the whole-image path (ZOOM_THRESHOLD=0):
zoom windows cost a window decode per click whatever the family (`bench fidelity` times them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backend.bench.click import SIZES, run_click_bench, synthetic_jpeg


def _prepare(model_type: str, checkpoint: str, device: str, precision: str):
    """Load the model and its 1 MP test image, and run the first (warm-up) pass, which is not a figure."""
    from backend.pipeline.images import decode_image
    from model import families
    from model.checkpoints import sha256_file

    start = time.perf_counter()
    model = families.load(Path(checkpoint), sha256_file(Path(checkpoint)), device)
    model.set_precision(precision)  # as the loader sets it: auto is fp32 on a CPU
    load_seconds = time.perf_counter() - start
    image = decode_image(synthetic_jpeg(SIZES["1MP"], seed=5), 10**9, model.input_side)
    model.encode(image.input_image)  # allocator and kernel warm-up
    return model, image, load_seconds


def _encode_once(model, image):
    start = time.perf_counter()
    features = model.encode(image.input_image)
    if model.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - start, features


def _report(model, image, seconds: list, features, load_seconds: float, repeat: int, batch: int) -> dict:
    """The figures of one model's process: its encodes, stored entry, peak RSS and, with `batch` > 1,
    `repeat` batched passes of `batch` images (images/s batched vs one by one)."""
    import numpy as np

    from backend.pipeline.embeddings import Embedding, serialize
    from backend.pipeline.images import decode_image

    blob = serialize(Embedding.quantized(features, image.original_size, image.input_size))
    batched = {}
    if batch > 1:
        images = [decode_image(synthetic_jpeg(SIZES["1MP"], seed=10 + i), 10**9, model.input_side).input_image
                  for i in range(batch)]
        model.encode_batch(images)  # warm-up at this batch size (allocator, cuDNN's algorithm search)
        passes = []
        for _ in range(repeat):
            start = time.perf_counter()
            model.encode_batch(images)
            if model.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            passes.append(time.perf_counter() - start)
        batched = {"batch": batch, "batched_pass_seconds": round(statistics.median(passes), 3),
                   "batched_images_per_second": round(batch / statistics.median(passes), 2)}
    return {"family": model.family, "size": model.size, "input_side": model.input_side, "precision": model.precision,
            "images_per_second": round(1 / statistics.median(seconds), 2), **batched,
            "encode_seconds": round(statistics.median(seconds), 3), "encode_runs": [round(s, 3) for s in seconds],
            "load_seconds": round(load_seconds, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "embedding_shape": list(features.shape), "embedding_bytes": len(blob),
            "embedding_raw_fp16_bytes": int(np.prod(features.shape) * 2)}


def serve_encodes(model_type: str, checkpoint: str, repeat: int, device: str, batch: int, precision: str) -> None:
    """The model's process, driven by the bench line by line: `encode` -> one encode's seconds,
    `done` -> the report. The bench alternates it with vit_b's process, so each pair of encodes
    meets the same load on a shared machine and their ratio holds where absolute seconds do not."""
    model, image, load_seconds = _prepare(model_type, checkpoint, device, precision)
    print("ready", flush=True)
    seconds, features = [], None
    for line in sys.stdin:
        if line.strip() == "encode":
            elapsed, features = _encode_once(model, image)
            seconds.append(elapsed)
            print(elapsed, flush=True)
        elif line.strip() == "done":
            print(json.dumps(_report(model, image, seconds, features, load_seconds, repeat, batch)), flush=True)
            return


class _EncoderProcess:
    """One model's `serve_encodes` process, on a random-weight checkpoint of its real architecture."""

    def __init__(self, work: Path, model_type: str, args, env: dict):
        import torch

        from model import families

        print(f"== {model_type}: writing a random-weight checkpoint of the real architecture ...", flush=True)
        self.model_type = model_type
        self.checkpoint = work / f"random_{model_type.replace('+', 'plus')}.pt"
        torch.save(families.random_checkpoint(model_type), self.checkpoint)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend.bench.encoder", "--serve", model_type, str(self.checkpoint),
             str(args.repeat), args.device, str(args.threads), str(args.batch), args.precision],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")

    def _expect(self, what: str) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"measuring {self.model_type} failed (exit {self.proc.returncode}) waiting for {what}")
        return line.strip()

    def _say(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def encode(self) -> float:
        self._say("encode")
        return float(self._expect("an encode"))

    def report(self) -> dict:
        self._say("done")
        row = {"model_type": self.model_type, **json.loads(self._expect("the report"))}
        self.proc.stdin.close()
        self.proc.wait()
        return row


def _print_row(row: dict) -> None:
    pairs = row.get("speedup_runs")
    print(f"   {row['model_type']}: encode {row['encode_seconds']} s/image ({row['precision']}), peak RSS "
          f"{row['peak_rss_mb']} MB, entry {row['embedding_bytes'] / 1e6:.2f} MB"
          + (f", {row['speedup_vs_vit_b']}x vit_b (median of {len(pairs)} alternating pairs)" if pairs else "")
          + (f", batch of {row['batch']}: {row['batched_images_per_second']} images/s vs "
             f"{row['images_per_second']} one by one" if "batch" in row else ""), flush=True)


def run_encoder_bench(args) -> dict:
    from model import families

    wanted = [m for m in (args.models.split(",") if args.models else families.MODEL_TYPES) if m]
    unknown = [m for m in wanted if m not in families.MODEL_TYPES]
    if unknown:
        sys.exit(f"unknown model types {unknown}; known: {', '.join(families.MODEL_TYPES)}")
    skipped = [m for m in wanted if not families.installed(m)]
    work = Path(tempfile.mkdtemp(prefix="sam-bench-encoder-"))
    figures: dict = {"device": args.device, "threads": args.threads, "random_weights": True, "batch": args.batch,
                     "precision_asked": args.precision, "speedup_method": "median of alternating vit_b/model pairs",
                     "click_path": "whole image (ZOOM_THRESHOLD=0)", "skipped_not_installed": skipped, "models": []}
    os.environ["ZOOM_THRESHOLD"] = "0"  # read by the backend bench click starts
    if args.threads:
        os.environ["TORCH_THREADS"] = str(args.threads)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    models = [m for m in wanted if m not in skipped]
    # vit_b's process stays up and encodes just before each encode of every other model: on a
    # shared machine whose load changes by the minute, the ratio of such a pair holds where the
    # absolute seconds do not (at most two models are loaded at once)
    reference = _EncoderProcess(work, "vit_b", args, env) if "vit_b" in models and len(models) > 1 else None
    rows, checkpoints = {}, []
    for model_type in models:
        if reference and model_type == "vit_b":
            continue  # its encodes are the first half of every pair; reported at the end
        process = _EncoderProcess(work, model_type, args, env)
        checkpoints.append(process.checkpoint)
        ratios = []
        for _ in range(args.repeat):
            before = reference.encode() if reference else None
            seconds = process.encode()
            if before is not None:
                ratios.append(before / seconds)
        row = process.report()
        if ratios:
            row["speedup_vs_vit_b"] = round(statistics.median(ratios), 1)
            row["speedup_runs"] = [round(r, 2) for r in ratios]
        rows[model_type] = row
        _print_row(row)
    if reference:
        checkpoints.append(reference.checkpoint)
        rows["vit_b"] = reference.report()
        _print_row(rows["vit_b"])
    if "vit_b" in rows:
        rows["vit_b"]["speedup_vs_vit_b"] = 1.0
    for model_type, checkpoint in zip(models, [work / f"random_{m.replace('+', 'plus')}.pt" for m in models]):
        row = rows[model_type]
        if args.warm:
            os.environ["SAM_CHECKPOINT"] = str(checkpoint)  # bench click serves the file SAM_CHECKPOINT names
            clicks = run_click_bench(argparse.Namespace(
                random_weights=False, model_type=model_type, sizes=args.sizes, outputs="brush,polygon", cold=1,
                warm=args.warm, threads=4, device=args.device, head=False))
            del os.environ["SAM_CHECKPOINT"]
            row["clicks"] = {size: {"cold_ms_p50": r["cold_ms"]["p50"],
                                    **{out: r[out]["warm_ms"]["p50"] for out in ("brush", "polygon") if out in r}}
                             for size, r in clicks["sizes"].items()}
        checkpoint.unlink()
        figures["models"].append(row)
    if figures["models"]:
        figures["fastest"] = min(figures["models"], key=lambda r: r["encode_seconds"])["model_type"]
    return figures


def print_encoder_table(figures: dict) -> None:
    print()
    print(f"encoders, random weights of the real architectures, device {figures['device']}, "
          f"{figures['threads'] or 'default'} threads; clicks: {figures['click_path']} through gunicorn + Redis")
    header = (f"{'model':<9} {'family':<17} {'input':>5} {'s/image':>8} {'vs vit_b':>8} {'peak RSS':>9} {'entry':>9}"
              f" {'1MP brush':>10} {'1MP poly':>9} {'20MP brush':>11} {'20MP poly':>10} {'cold 1MP':>9}")
    print(header)
    print("-" * len(header))
    for r in figures["models"]:
        c = r.get("clicks", {})
        one, twenty = c.get("1MP", {}), c.get("20MP", {})

        def ms(v):
            return f"{v:.0f}ms" if isinstance(v, (int, float)) else "-"

        print(f"{r['model_type']:<9} {r['family']:<17} {r['input_side']:>5} {r['encode_seconds']:>7.2f}s"
              f" {str(r.get('speedup_vs_vit_b', '-')) + 'x':>8} {r['peak_rss_mb']:>7}MB {r['embedding_bytes'] / 1e6:>7.2f}MB"
              f" {ms(one.get('brush')):>10} {ms(one.get('polygon')):>9} {ms(twenty.get('brush')):>11}"
              f" {ms(twenty.get('polygon')):>10} {ms(one.get('cold_ms_p50')):>9}")
    if figures["skipped_not_installed"]:
        print(f"not installed here (skipped): {', '.join(figures['skipped_not_installed'])}")
    if figures.get("batch", 1) > 1:
        print()
        print(f"batched encoding, {figures['batch']} images per forward pass")
        header = f"{'model':<9} {'precision':<9} {'images/s alone':>14} {'images/s batched':>16} {'gain':>6}"
        print(header)
        print("-" * len(header))
        for r in figures["models"]:
            print(f"{r['model_type']:<9} {r['precision']:<9} {r['images_per_second']:>14.2f} "
                  f"{r['batched_images_per_second']:>16.2f} {r['batched_images_per_second'] / r['images_per_second']:>5.2f}x")
    print("s/image: encoder only, median; entry: the stored cache entry (fp16, byte-shuffled, zstd); clicks: warm p50")


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _, _, model_type, checkpoint, repeat, device, threads, batch, precision = sys.argv
    if int(threads):
        import torch

        torch.set_num_threads(int(threads))
    serve_encodes(model_type, checkpoint, int(repeat), device, int(batch), precision)
