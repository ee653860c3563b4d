"""SAM2 teacher throughput: images/s per batch size, with and without AMP, on one device.

Usage: python -m benchmarks.teacher [--model sam2.1_hiera_b+] [--weights PATH] [--device cuda:0]
           [--batch-sizes 1 8 32] [--batches 3]
Without ``--weights`` the model has random weights (throughput does not depend on them). AMP
(bfloat16 autocast) is measured on CUDA only. Writes ``benchmarks/results/teacher_<device>.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from arraystore.converters.sa1b.teacher import Sam2Teacher
from benchmarks.report import machine

RESULTS = Path(__file__).parent / "results"


def images_per_second(teacher: Sam2Teacher, batch: int, batches: int) -> float:
    images = np.random.default_rng(0).integers(0, 256, (batch, 1024, 1024, 3), np.uint8)
    teacher(images)  # warm-up: allocator, kernels, autotuning
    if teacher.device.type == "cuda":
        torch.cuda.synchronize(teacher.device)
    start = time.perf_counter()
    for _ in range(batches):
        teacher(images)
    if teacher.device.type == "cuda":
        torch.cuda.synchronize(teacher.device)
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sam2.1_hiera_b+")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    lines = [f"# SAM2 teacher throughput: {args.model} on {args.device}", "",
             f"- machine: {machine()}; GPU: {gpu}; torch {torch.__version__}",
             f"- command: `python -m benchmarks.teacher --model {args.model} --device "
             f"{args.device} --batch-sizes {' '.join(map(str, args.batch_sizes))} --batches "
             f"{args.batches}`", "",
             "| batch | AMP | images/s |", "|---:|---|---:|"]
    for amp in (False, True) if device.type == "cuda" else (False,):
        for batch in args.batch_sizes:
            teacher = Sam2Teacher(args.model, args.weights, args.device, batch, amp)
            rate = images_per_second(teacher, batch, args.batches)
            lines.append(f"| {batch} | {'bf16' if amp else 'off'} | {rate:.2f} |")
            print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"teacher_{args.device.replace(':', '')}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
