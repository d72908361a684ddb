"""Sharded datasets at training speed: prepare time, reader against training throughput, and peak memory of training
against the dataset's size.

The script makes its own data: ``--images`` random-texture JPEGs at 64 x 64 in 10 class folders (and a folder of
the first ``--small`` of them, hard-linked), prepared with ``rrm data prepare --shards``. It then measures

- prepare: seconds and images/s to decode, write and hash the large folder with ``--workers`` processes;
- reader: images/s of ``rrm.data.batches`` over the shards, shuffled, batch 128, as the trainer draws them (read in
  the background thread, scaled to floats and augmented with crop-flip), and of the bare reads;
- training: images/s of natural training steps (forward, backward, SGD) of resnet18 and cnn on those batches,
  after two warm-up steps;
- memory: peak RSS of a fresh process that trains cnn for one epoch on the small and on the large shards (and, for
  contrast, on the large dataset read into memory first).

Targets: reader >= 3x resnet18's training throughput; peak RSS of training grows < 10% from the small dataset to
the large one.

    python benchmarks/bench_stream.py                         # 20,000 images against 5,000
    python benchmarks/bench_stream.py --images 8000 --small 2000 --work-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10


def make_images(root: Path, n: int, small: Path, n_small: int) -> float:
    """``n`` JPEGs of smooth random textures in class folders; the first ``n_small`` also linked under ``small``."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % CLASSES
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((64, 64), Image.BILINEAR)
        path = root / f"class{label}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        if i < n_small:
            link = small / path.relative_to(root)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, link)
    return time.perf_counter() - started


def prepare(root: Path, out: Path, workers: int) -> tuple[float, object]:
    from rrm.data import prepare_dataset

    started = time.perf_counter()
    data, _ = prepare_dataset("imagefolder", out, shards=True, workers=workers, root=root, image_size=64)
    return time.perf_counter() - started, data


def reader_rate(data, batch_size: int, bare: bool) -> float:
    import torch

    from rrm.data import batches

    started = time.perf_counter()
    if bare:
        order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))
        for start in range(0, len(order), batch_size):
            data.train_x.read(order[start : start + batch_size])
    else:
        generator = torch.Generator().manual_seed(0)
        for _ in batches(
            data.train_x, data.train_y, batch_size, shuffle=True, generator=generator, augment="crop-flip"
        ):
            pass
    return len(data.train_y) / (time.perf_counter() - started)


def training_rate(data, model_name: str, batch_size: int, steps: int) -> float:
    """Natural training steps per second times the batch, on batches from the reader (reading not timed)."""
    import torch

    from rrm.data import batches
    from rrm.models import build_model

    model = build_model(model_name, **data.model_kwargs())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    stream = batches(
        data.train_x,
        data.train_y,
        batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        augment="crop-flip",
    )
    seconds = 0.0
    for i, (x, y) in zip(range(steps + 2), stream):
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:  # two warm-up steps
            seconds += time.perf_counter() - started
    return steps * batch_size / seconds


def peak_rss_of_training(dataset: Path, in_memory: bool) -> dict:
    """A fresh process trains cnn for one epoch on ``dataset``; returns its peak RSS and epoch time.

    The peak is the kernel's VmHWM of the process, not ``getrusage``'s ru_maxrss: Linux carries ru_maxrss over from
    the parent through fork and exec, so a child would report at least this script's own peak.
    """
    code = f"""
import json, re, dataclasses, tempfile
from rrm.data import load_dataset, as_tensor
from rrm.train import TrainConfig, train
data = load_dataset({str(dataset)!r})
if {in_memory!r}:
    data = dataclasses.replace(data, train_x=as_tensor(data.train_x), test_x=as_tensor(data.test_x))
cfg = TrainConfig(dataset={str(dataset)!r}, model="cnn", epochs=1, batch_size=128, monitor_examples=0,
                  progress=False, out_dir=tempfile.mkdtemp())
result = train(cfg, data=data)
hwm_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({{"peak_rss_mib": hwm_kib / 1024,
                  "epoch_seconds": result.history[0]["epoch_seconds"], "images": len(data.train_y)}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"training on {dataset} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_mib(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=None, help="prepare's processes [default: the CPUs]")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per model")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the images and shards go [a temp dir]")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    import torch

    from rrm.data.shard_writer import default_workers

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-stream-"))
    workers = args.workers or default_workers()
    results: dict = {
        "images": args.images,
        "small": args.small,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    results["generate_seconds"] = make_images(work / "large", args.images, work / "small", args.small)
    seconds, large = prepare(work / "large", work / "large-shards", workers)
    results["prepare_seconds"] = seconds
    results["prepare_images_per_s"] = args.images / seconds
    _, _ = prepare(work / "small", work / "small-shards", workers)
    results["disk_mib"] = {"small": disk_mib(work / "small-shards"), "large": disk_mib(work / "large-shards")}
    results["reader_images_per_s"] = reader_rate(large, args.batch_size, bare=False)
    results["bare_read_images_per_s"] = reader_rate(large, args.batch_size, bare=True)
    results["training_images_per_s"] = {
        m: training_rate(large, m, args.batch_size, args.steps) for m in ("resnet18", "cnn")
    }
    results["reader_over_resnet18"] = results["reader_images_per_s"] / results["training_images_per_s"]["resnet18"]
    rss = {
        "small": peak_rss_of_training(work / "small-shards", in_memory=False),
        "large": peak_rss_of_training(work / "large-shards", in_memory=False),
        "large_in_memory": peak_rss_of_training(work / "large-shards", in_memory=True),
    }
    results["training_peak_rss"] = rss
    results["rss_growth"] = rss["large"]["peak_rss_mib"] / rss["small"]["peak_rss_mib"] - 1
    results["bench_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(
        f"prepare: {args.images} JPEGs in {seconds:.1f} s ({results['prepare_images_per_s']:.0f} images/s, "
        f"{workers} workers)"
    )
    print(
        f"reader: {results['reader_images_per_s']:.0f} images/s (crop-flip, batch {args.batch_size}); bare reads "
        f"{results['bare_read_images_per_s']:.0f} images/s"
    )
    for model, rate in results["training_images_per_s"].items():
        print(f"training {model}: {rate:.0f} images/s (natural step, batch {args.batch_size})")
    print(f"reader / resnet18 training: {results['reader_over_resnet18']:.1f}x (target >= 3x)")
    for name, row in rss.items():
        print(
            f"peak RSS, one cnn epoch on {name} ({row['images']} training images): {row['peak_rss_mib']:.0f} MiB "
            f"({row['epoch_seconds']:.1f} s)"
        )
    print(
        f"peak RSS growth from {args.small} to {args.images} images: {100 * results['rss_growth']:+.1f}% "
        f"(target < 10%); shards on disk {results['disk_mib']['small']:.0f} / {results['disk_mib']['large']:.0f} MiB"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
