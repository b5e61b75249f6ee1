"""Speed measurements (README, Speed), each printed with its baseline measured in the same run.

    python bench.py                 # everything at full size (takes several minutes on a CPU)
    python bench.py --quick         # tiny sizes: checks that every entry runs
    python bench.py --only csv metrics
    python bench.py --only networks --networks segformer_b0 dinov2_s

Entries: `csv` (label CSV parse vs numpy.loadtxt, peak memory, cached load), `metrics` (Rand
index and per-class Dice vs per-image implementations), `pipeline` (samples/s of the labeled,
unlabeled and evaluation datasets on one core vs the per-sample torchvision.transforms.v2 pipeline
they replaced), `loading` (a training step's images/s fed by the real DataLoader vs synthetic
tensors, and whether data loading is the bottleneck), `networks` (images/s and achieved
GFLOP/s of each network vs the measured matmul peak; FLOPs counted with
torch.utils.flop_counter.FlopCounterMode on one image — matmuls, convolutions and attention, not
elementwise ops — a train step counted as 3× the forward), `gpu_options` (train-step images/s with
amp_dtype float16 / bfloat16, channels_last and compile vs the eager float32 step, on CUDA; compile
alone on the CPU), `unimatch` (one UniMatch step, CutMix
partners from a third loader and from the same batch, vs one supervised step), `ddp` (1 vs 2
gloo processes at the same global batch: throughput ratio). No test asserts on these timings.
"""
import argparse
import os
import shutil
import tempfile
import time
import tracemalloc

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dataloaders.datasets import (LabeledSlices, UnlabeledSlices, geometric_augmentation, intensity_augmentation,
                                  normalization_stats, normalize, outside_air_mask, resize, strong_views)
from dataloaders.label_csv import load_label_masks, read_label_csv, write_label_csv
from dataloaders.phantom import render_slice
from dataloaders.sampling import epoch_loader
from networks import build_model
from utils.builders import build_network, compile_network, network_family
from utils.config import Config, load_config
from utils.engine import to_device
from utils.metrics import per_class_dice, rand_index
from utils.optim import autocast, make_scaler, optimizer_step


# ==== label CSV ====
def _best_time(function, repeats=1):
    """(best wall time in s, result of the last call)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def _challenge_like_masks(n_images, side, seed=0):
    """(N, side, side) uint8: 40 % labeled images with blocky structures 1..54, the rest all 0."""
    rng = np.random.default_rng(seed)
    grid = side // 16
    labels = rng.integers(1, 55, size=(n_images, grid, grid)) * (rng.random((n_images, grid, grid)) < 0.3)
    labels[int(0.4 * n_images):] = 0
    return labels.repeat(16, axis=1).repeat(16, axis=2).astype(np.uint8)


def bench_csv(report, tmp_dir, n_images=2000, quick=False):
    """read_label_csv vs numpy.loadtxt on a 65,536-row × n_images label CSV; cached loads; memory.

    quick: 200 images, and loadtxt runs on the first 1/16 of the rows, its time scaled ×16.
    """
    if quick:
        n_images = min(n_images, 200)
    side = 256
    masks = _challenge_like_masks(n_images, side)
    names = [f"{i}.png" for i in range(n_images)]
    path = os.path.join(tmp_dir, "bench_y_train.csv")
    write_seconds, _ = _best_time(lambda: write_label_csv(path, masks, names))
    size_mb = os.path.getsize(path) / 1e6
    report("csv_write", f"write_label_csv {side * side} rows x {n_images} images ({size_mb:.0f} MB): "
                        f"{write_seconds:.2f} s ({size_mb / write_seconds:.0f} MB/s)")

    read_seconds, (parsed, _, _) = _best_time(lambda: read_label_csv(path), repeats=2)
    if not np.array_equal(parsed, masks):
        report("csv_parse", "ERROR: read_label_csv does not return what was written")
        return
    columns = range(1, n_images + 1)
    if quick:
        loadtxt_rows = side * side // 16
        loadtxt_seconds, _ = _best_time(lambda: np.loadtxt(path, delimiter=",", skiprows=1, max_rows=loadtxt_rows,
                                                           usecols=columns, dtype=np.uint8))
        loadtxt_seconds *= side * side / loadtxt_rows
        how = "loadtxt on 1/16 of the rows, x16"
    else:
        loadtxt_seconds, _ = _best_time(lambda: np.loadtxt(path, delimiter=",", skiprows=1, usecols=columns,
                                                           dtype=np.uint8))
        how = "loadtxt on the whole file"
    report("csv_parse", f"read_label_csv {read_seconds:.2f} s vs numpy.loadtxt {loadtxt_seconds:.2f} s ({how}): "
                        f"{loadtxt_seconds / read_seconds:.1f}x faster "
                        f"({read_seconds / loadtxt_seconds:.2f}x the time)")

    tracemalloc.start()
    read_label_csv(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    report("csv_memory", f"read_label_csv peak traced memory {peak / 1e6:.0f} MB = "
                         f"{peak / os.path.getsize(path):.2f}x the file, {peak / masks.nbytes:.2f}x the output")

    for cache_file in (path + ".cache.npy", path + ".cache.json"):
        if os.path.exists(cache_file):
            os.remove(cache_file)
    cold_seconds, _ = _best_time(lambda: load_label_masks(path))
    warm_seconds, (cached, _) = _best_time(lambda: load_label_masks(path), repeats=3)
    ok = "" if np.array_equal(cached, masks) else " ERROR: cache differs from the CSV"
    report("csv_cache", f"load_label_masks cold {cold_seconds:.2f} s, warm (memory-mapped .npy) "
                        f"{warm_seconds * 1e3:.1f} ms: {cold_seconds / warm_seconds:.0f}x{ok}")


# ==== metrics ====
def _per_image_unique_rand_index(truth, pred):
    """Baseline: per image, np.unique relabelling and pair counts (the scikit-learn recipe)."""
    scores = []
    for truth_image, pred_image in zip(truth.reshape(len(truth), -1), pred.reshape(len(pred), -1)):
        foreground = truth_image != 0
        if not foreground.any():
            continue
        _, truth_ids = np.unique(truth_image[foreground], return_inverse=True)
        _, pred_ids = np.unique(pred_image[foreground], return_inverse=True)
        _, cells = np.unique(truth_ids.astype(np.int64) * (pred_ids.max() + 1) + pred_ids, return_counts=True)

        def pairs(counts):
            return float(np.sum(counts.astype(np.float64) * (counts - 1) / 2))

        index, truth_pairs, pred_pairs = pairs(cells), pairs(np.bincount(truth_ids)), pairs(np.bincount(pred_ids))
        total = foreground.sum() * (foreground.sum() - 1) / 2
        expected = truth_pairs * pred_pairs / total if total else 0.0
        maximum = (truth_pairs + pred_pairs) / 2
        scores.append(1.0 if maximum == expected else (index - expected) / (maximum - expected))
    return float(np.mean(scores))


def _per_image_per_class_dice(truth, pred, num_classes):
    """Baseline: a boolean mask per image and class."""
    per_class = []
    for label in range(1, num_classes):
        scores = []
        for truth_image, pred_image in zip(truth, pred):
            in_truth, in_pred = truth_image == label, pred_image == label
            size_sum = in_truth.sum() + in_pred.sum()
            if size_sum:
                scores.append(2 * (in_truth & in_pred).sum() / size_sum)
        if scores:
            per_class.append(np.mean(scores))
    return float(np.mean(per_class))


def _instance_masks(n_images, side, seed):
    """(N, side, side) uint8 structure ids 0..255 in 32×32-pixel blocks, ~30 % background."""
    rng = np.random.default_rng(seed)
    grid = side // 32
    ids = rng.integers(1, 256, size=(n_images, grid, grid)) * (rng.random((n_images, grid, grid)) < 0.7)
    return ids.repeat(32, axis=1).repeat(32, axis=2).astype(np.uint8)


def bench_metrics(report, quick=False):
    """rand_index on 300 masks 512×512 and per_class_dice on 500 masks 256×256 vs per-image baselines.

    quick: 20 masks each.
    """
    n_images = 20 if quick else 300
    truth = _instance_masks(n_images, 512, seed=1)
    pred = (np.roll(truth, 5, axis=2).astype(np.int64) * 7 % 256).astype(np.uint8)  # shifted, relabelled
    fast_seconds, fast = _best_time(lambda: rand_index(truth, pred), repeats=2)
    slow_seconds, slow = _best_time(lambda: _per_image_unique_rand_index(truth, pred))
    ok = "" if abs(fast - slow) < 1e-9 else f" ERROR: {fast} != {slow}"
    report("metric_rand_index", f"rand_index {n_images}x512x512: {fast_seconds:.3f} s vs per-image np.unique "
                                f"{slow_seconds:.3f} s: {slow_seconds / fast_seconds:.1f}x{ok}")

    n_images = 20 if quick else 500
    truth = _challenge_like_masks(n_images, 256, seed=2)
    truth[int(0.4 * n_images):] = _challenge_like_masks(n_images, 256, seed=3)[:n_images - int(0.4 * n_images)]
    pred = np.where(np.random.default_rng(4).random(truth.shape) < 0.9, truth, 0).astype(np.uint8)
    fast_seconds, (fast, _) = _best_time(lambda: per_class_dice(truth, pred, 55), repeats=2)
    slow_seconds, slow = _best_time(lambda: _per_image_per_class_dice(truth, pred, 55))
    ok = "" if abs(fast - slow) < 1e-9 else f" ERROR: {fast} != {slow}"
    report("metric_dice", f"per_class_dice {n_images}x256x256, 55 classes: {fast_seconds:.3f} s vs per-image "
                          f"per-class loop {slow_seconds:.3f} s: {slow_seconds / fast_seconds:.1f}x{ok}")


# ==== input pipeline ====
class _RandomGammaV2:
    """x -> x ** gamma, gamma log-uniform in (0.7, 1.5), p = 0.5 (the v2 reference's gamma)."""

    def __call__(self, image):
        if torch.rand(()) >= 0.5:
            return image
        gamma = float(torch.empty(()).uniform_(*np.log((0.7, 1.5))).exp())
        return image.clamp(0, 1) ** gamma


class _V2Pipeline:
    """Naive reference: the per-sample torchvision.transforms.v2 pipeline the datasets ran before
    (one RandomAffine per tv_tensor — image, mask and outside-air mask each warped with their own
    sampling grid — the air mask recomputed per sample, the intensity perturbation in torch)."""

    def __init__(self, cfg, data, img_size, norm, air_threshold=10):
        steps = [v2.RandomAffine(degrees=cfg.aug_rotate, translate=(cfg.aug_translate,) * 2,
                                 scale=tuple(cfg.aug_scale),
                                 interpolation=v2.InterpolationMode.BILINEAR, fill=0)]
        if cfg.aug_flip:
            steps.append(v2.RandomHorizontalFlip())
        self.geometry = v2.Compose(steps)
        self.intensity = v2.Compose([
            v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3)], p=0.8),
            _RandomGammaV2(),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.5),
            v2.RandomApply([v2.GaussianNoise(sigma=0.03, clip=True)], p=0.5),
        ])
        self.data, self.img_size, self.norm, self.air_threshold = data, img_size, norm, air_threshold

    def labeled(self, index, augment=True):
        raw = np.array(self.data.train_images[index])
        image = tv_tensors.Image(resize(torch.from_numpy(raw)[None], self.img_size))
        mask = torch.from_numpy(np.asarray(self.data.train_masks[index], dtype=np.int64))
        mask = tv_tensors.Mask(v2.functional.resize(mask[None], [self.img_size] * 2,
                                                    interpolation=v2.InterpolationMode.NEAREST_EXACT)[0])
        air = tv_tensors.Mask(torch.from_numpy(outside_air_mask(image[0].numpy(), self.air_threshold)))
        if augment:
            image, mask, air = self.geometry(image, mask, air)
        return {"image": normalize(image.as_subclass(torch.Tensor), self.norm),
                "mask": mask.as_subclass(torch.Tensor),
                "annotated": torch.from_numpy(np.asarray(self.data.annotated[index])),
                "certain_background": air.as_subclass(torch.Tensor), "index": index}

    def unlabeled(self, index):
        raw = torch.from_numpy(np.array(self.data.train_images[index]))[None]
        weak = self.geometry(tv_tensors.Image(resize(raw, self.img_size)))
        weak = weak.as_subclass(torch.Tensor).float() / 255.0
        return {"image_w": normalize(weak, self.norm), "image_s1": normalize(self.intensity(weak), self.norm),
                "image_s2": normalize(self.intensity(weak), self.norm), "index": index}


def _phantom_data(count, size):
    """`count` phantom slices at size² as the arrays the datasets read (55 classes, all annotated)."""
    images, masks = zip(*(render_slice(0, index, size) for index in range(count)))
    return SimpleNamespace(train_images=np.stack(images), train_masks=np.stack(masks),
                           annotated=np.ones((count, 55), bool))


def _interleaved_seconds(functions, rounds, calls):
    """{name: best seconds per call} of `functions {name: f(i)}`, timed in alternating rounds of
    `calls` calls each, so that a change in the machine's load hits all of them alike."""
    best = dict.fromkeys(functions, float("inf"))
    for round_index in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            for call in range(calls):
                function(round_index * calls + call)
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def bench_pipeline(report, size=256, quick=False, batch=8):
    """Samples/s on one core of the labeled, unlabeled (weak + two strong views) and evaluation
    paths vs the v2 reference, on phantom slices at size²; both run single-threaded. The unlabeled
    path counts everything that makes its training tensors: the worker's samples, their collation
    and `strong_views` on batches of `batch` (run on this CPU; on a GPU that part leaves the CPU,
    so the worker's share is also printed, and `strong_views` on CUDA when present)."""
    if quick:
        size = 64
    rounds, calls = (2, 3) if quick else (5, 40)
    cfg = load_config("supervised", [])
    data = _phantom_data(4 if quick else 16, size)
    norm = normalization_stats(data.train_images)
    indices = np.arange(len(data.train_images))
    labeled = LabeledSlices(data, indices, size, norm, augment=geometric_augmentation(cfg))
    evaluation = LabeledSlices(data, indices, size, norm)
    unlabeled = UnlabeledSlices(data.train_images, indices, size, norm, geometric_augmentation(cfg),
                                intensity_augmentation())
    reference = _V2Pipeline(cfg, data, size, norm)
    count = len(indices)

    def worker_batch(i):  # what the DataLoader workers deliver: `batch` samples, collated
        return default_collate([unlabeled[(j % count, j)] for j in range(batch * i, batch * (i + 1))])
    one_sample = {
        "labeled": (lambda i: reference.labeled(i % count), lambda i: labeled[(i % count, i)]),
        "evaluation": (lambda i: reference.labeled(i % count, augment=False), lambda i: evaluation[i % count]),
    }
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenCV runs on one thread in the datasets already
    try:
        for name, (naive, fast) in one_sample.items():
            seconds = _interleaved_seconds({"v2": naive, "new": fast}, rounds, calls)
            report(f"input pipeline {name} ({size}², 1 core)",
                   f"v2 {1 / seconds['v2']:.0f} samples/s vs {1 / seconds['new']:.0f} samples/s: "
                   f"{seconds['v2'] / seconds['new']:.1f}x")
        seconds = _interleaved_seconds({
            "v2": lambda i: [reference.unlabeled(j % count) for j in range(batch * i, batch * (i + 1))],
            "new": lambda i: strong_views(worker_batch(i)), "worker": worker_batch}, rounds, max(1, calls // batch))
        per_sample = {name: value / batch for name, value in seconds.items()}
        report(f"input pipeline unlabeled, weak + 2 strong ({size}², 1 core)",
               f"v2 {1 / per_sample['v2']:.0f} samples/s vs {1 / per_sample['new']:.0f} samples/s: "
               f"{per_sample['v2'] / per_sample['new']:.1f}x (strong views batched on this CPU, batch {batch})")
        report("  of which the workers (the CPU's part with the strong views on a GPU)",
               f"{1 / per_sample['worker']:.0f} samples/s: {per_sample['v2'] / per_sample['worker']:.1f}x the v2 "
               f"reference; strong_views {1e3 * (per_sample['new'] - per_sample['worker']):.3f} ms/sample on this CPU")
    finally:
        torch.set_num_threads(torch_threads)
    if not torch.cuda.is_available():
        report("  strong_views on CUDA", "no CUDA: skipped")
        return
    on_device = to_device(worker_batch(0), torch.device("cuda"))
    seconds = _seconds_per_call(lambda: strong_views(on_device), torch.device("cuda"), min_seconds=0.5, min_calls=10)
    report(f"  strong_views on CUDA (batch {batch})", f"{1e3 * seconds / batch:.4f} ms/sample")


def bench_loading(report, quick=False):
    """Training-step images/s with the real input pipeline (DataLoader, the default config's
    workers, batch size and network) vs synthetic tensors already in memory."""
    cfg = load_config("supervised", [])
    size, batch, min_steps = (64, 2, 2) if quick else (cfg.img_size, cfg.batch_size, 4)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = _phantom_data(8 if quick else 32, size)
    norm = normalization_stats(data.train_images)
    dataset = LabeledSlices(data, np.arange(len(data.train_images)), size, norm,
                            augment=geometric_augmentation(cfg))
    torch.manual_seed(0)
    model_kwargs = cfg.model_kwargs[network_family(cfg.model)]
    model = build_model(cfg.model, in_channels=1, num_classes=55, **model_kwargs).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(images, masks):
        loss = F.cross_entropy(model(images.to(device, non_blocking=True)), masks.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def loader(steps):
        return epoch_loader(dataset, seed=0, epoch=0, stream=0, num_batches=steps + 1, batch_size=batch,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda")

    def images_per_second(batches, consume, steps):
        """After one warm-up batch (worker start-up, first kernels)."""
        iterator = iter(batches)
        consume(next(iterator))
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            consume(next(iterator))
        _synchronize(device)
        return steps * batch / (time.perf_counter() - start)

    synthetic = {"image": torch.randn(batch, 1, size, size, device=device),
                 "mask": torch.randint(0, 55, (batch, size, size), device=device)}
    steps = min_steps
    synthetic_rate = images_per_second(iter(lambda: synthetic, None), lambda b: step(b["image"], b["mask"]), steps)
    real_rate = images_per_second(loader(steps), lambda b: step(b["image"], b["mask"]), steps)
    loader_steps = steps * 4
    loader_rate = images_per_second(loader(loader_steps), lambda b: None, loader_steps)
    label = f"{cfg.model} {model_kwargs}, {batch}×{size}², {cfg.num_workers} workers, {device.type}"
    report(f"train step, synthetic tensors ({label})", f"{synthetic_rate:.1f} img/s")
    report("train step, real input pipeline", f"{real_rate:.1f} img/s = {real_rate / synthetic_rate:.0%} of synthetic")
    verdict = "IS" if loader_rate < synthetic_rate else "is not"
    report("input pipeline alone", f"{loader_rate:.1f} img/s: data loading {verdict} the bottleneck "
                                   f"({loader_rate / synthetic_rate:.1f}x what the step consumes)")


# ==== networks ====
BENCH_MODELS = [("attunet", {"base": 16}), ("attunet", {"base": 64}), ("segformer_b0", {}), ("dinov2_s", {})]


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(function, device, min_seconds, min_calls):
    """Mean wall time of `function()` after a warm-up call, over >= min_calls and >= min_seconds."""
    function()
    _synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        function()
        calls += 1
    _synchronize(device)
    return (time.perf_counter() - start) / calls


def _matmul_peak_gflops(device, dtype, size, min_seconds):
    """GFLOP/s of a large square matmul (2·n³ FLOPs per product)."""
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size ** 3 / _seconds_per_call(lambda: left @ right, device, min_seconds, 3) / 1e9


# FlopCounterMode knows the CUDA attention kernels but not the CPU one; count it the same way
_CPU_ATTENTION_FLOPS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CPU_ATTENTION_FLOPS = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda query, key, value, *args, out_shape=None, **kwargs:
                sdpa_flop_count(query, key, value),
    }


def _counted_flops(function):
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        function()
    return counter.get_total_flops()


def bench_networks(report, size=256, batch=8, quick=False, names=None):
    """report(name, value_str) prints one line. quick=True: tiny sizes, for a smoke test;
    names: only these networks of BENCH_MODELS (None: all)."""
    if quick:
        size, batch = 64, 2
    min_seconds, min_calls = (0.1, 1) if quick else (2.0, 3)
    num_classes = 55
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    peak_dtype = amp_dtype or torch.float32
    peak = _matmul_peak_gflops(device, peak_dtype, 1024 if quick else 4096, min_seconds)
    report(f"matmul peak ({str(peak_dtype).removeprefix('torch.')}, {device.type})",
           f"{peak:.1f} GFLOP/s")

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    for name, options in BENCH_MODELS:
        if names and name not in names:
            continue
        label = name + "".join(f" {key}={value}" for key, value in options.items())
        torch.manual_seed(0)
        model = build_model(name, in_channels=1, num_classes=num_classes, **options).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        images = torch.randn(batch, 1, size, size, device=device)
        targets = torch.randint(0, num_classes, (batch, size, size), device=device)

        def forward(inputs):
            with torch.no_grad(), autocast():
                return model(inputs)

        def train_step(inputs, labels):
            with autocast():
                loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        model.eval()
        forward_flops = _counted_flops(lambda: forward(images[:1])) * batch
        train_flops = 3 * forward_flops
        for layout_name, layout in (("NCHW", torch.contiguous_format),
                                    ("channels_last", torch.channels_last)):
            model.to(memory_format=layout)
            images = images.contiguous(memory_format=layout)
            steps = (("forward", lambda: forward(images), forward_flops),
                     ("train step", lambda: train_step(images, targets), train_flops))
            for mode, function, flops in steps:
                model.train(mode == "train step")
                seconds = _seconds_per_call(function, device, min_seconds, min_calls)
                achieved = flops / seconds / 1e9
                report(f"{label} {mode} {layout_name} ({batch}×{size}²)",
                       f"{batch / seconds:.1f} img/s, {achieved:.1f} GFLOP/s "
                       f"= {achieved / peak:.0%} of peak")


# ==== GPU options: amp_dtype, channels_last, compile ====
def _options_step_rate(cfg, device, batch, size, min_seconds, compile_backend=None):
    """Training-step images/s (synthetic tensors) of `cfg`'s network as the training scripts build
    it (build_network: channels_last; autocast and loss scaling from amp/amp_dtype), compiled with
    compile_network(`compile_backend`) when given (the first call, not timed, compiles)."""
    torch.manual_seed(0)
    data = SimpleNamespace(num_classes=cfg.num_classes)
    model = build_network(Config({**cfg, "compile": False}), data, device)[0].train()
    if compile_backend:
        compile_network(model, compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_scaler(device, cfg)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, cfg.num_classes, (batch, size, size), device=device)

    def step():
        with autocast(device, cfg):
            loss = F.cross_entropy(model(images), targets)
        optimizer_step(loss, optimizer, scaler, cfg)

    step()  # a second warm-up call: compilation of the backward and autotuning happen late
    return batch / _seconds_per_call(step, device, min_seconds, min_calls=1 if min_seconds < 1 else 3)


def bench_gpu_options(report, quick=False):
    """Training-step images/s of each GPU option relative to the eager float32 step of the same
    network (the default AttUNet and SegFormer-B0): `amp_dtype` float16 / bfloat16, `channels_last`,
    `compile: true` — on CUDA; on the CPU, `compile` alone (inductor generates C++ there, 2 images
    per step to keep it to minutes; --quick checks the compile path with aot_eager, which
    generates no code)."""
    base = load_config("supervised", [])
    batch, size, min_seconds = (2, 64, 0.1) if quick else (base.batch_size, base.img_size, 2.0)
    cpu_batch, cpu_backend = 2, "aot_eager" if quick else "inductor"
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    variants = {"amp_dtype float16": ({"amp": True, "amp_dtype": "float16"}, None),
                "amp_dtype bfloat16": ({"amp": True, "amp_dtype": "bfloat16"}, None),
                "channels_last": ({"channels_last": True}, None),
                "compile: true": ({}, "inductor")}
    for model_name in ("attunet", "segformer_b0"):
        cfg = Config({**base, "model": model_name, "amp": False, "channels_last": False})

        def label(images):
            return f"{model_name} {cfg.model_kwargs[network_family(model_name)]}, {images}×{size}²"
        if torch.cuda.is_available():
            cuda = torch.device("cuda")
            eager = _options_step_rate(cfg, cuda, batch, size, min_seconds)
            report(f"eager float32 train step ({label(batch)}, cuda)", f"{eager:.1f} img/s")
            for option, (changes, backend) in variants.items():
                rate = _options_step_rate(Config({**cfg, **changes}), cuda, batch, size, min_seconds, backend)
                report(f"  {option} ({model_name}, cuda)", f"{rate:.1f} img/s = {rate / eager:.2f}x eager float32")
        else:
            for option in variants:
                report(f"{option} ({model_name}, cuda)", "no CUDA: skipped")
        if compiler is None:
            report(f"compile ({model_name}, cpu)", "skipped: no C++ compiler on PATH (inductor needs one)")
            continue
        cpu = torch.device("cpu")
        eager = _options_step_rate(cfg, cpu, cpu_batch, size, min_seconds)
        try:
            compiled = _options_step_rate(cfg, cpu, cpu_batch, size, min_seconds, cpu_backend)
        except Exception as error:  # report why compilation failed rather than stop the bench
            report(f"compile ({model_name}, cpu)", f"failed: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        report(f"compile ({label(cpu_batch)}, cpu, {cpu_backend})",
               f"eager {eager:.2f} img/s vs compiled {compiled:.2f} img/s: {compiled / eager:.2f}x")


# ==== UniMatch step ====
def bench_unimatch_step(report, size=256, batch=4, quick=False):
    """One UniMatch step vs one supervised step at the same labeled batch (target:
    ≤ 4×; the official implementation measured 6.5× here with a 16-channel U-Net at 256²,
    4 labeled + 4 unlabeled)."""
    from train_unimatch import unimatch_step
    from utils.losses import build_loss, build_stream_loss

    if quick:
        size, batch = 64, 2
    cfg = load_config("unimatch", [])  # train_unimatch.py's defaults: losses, τ, CutMix, FP
    num_classes = cfg.num_classes
    torch.manual_seed(0)
    model = build_model("attunet", in_channels=1, num_classes=num_classes, base=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_sup, loss_stream = build_loss(cfg), build_stream_loss(cfg.stream_loss, cfg)

    def image():
        return torch.randn(batch, 1, size, size)
    batch_x = {"image": image(), "mask": torch.randint(0, num_classes, (batch, size, size)),
               "annotated": torch.ones(batch, num_classes, dtype=torch.bool),
               "certain_background": torch.zeros(batch, size, size, dtype=torch.bool)}
    batch_u = {"image_w": image(), "image_s1": image(), "image_s2": image()}
    batch_mix = {"image_w": image(), "image_s1": image(), "image_s2": image()}

    def step(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def supervised():
        logits = model(batch_x["image"])
        step(loss_sup(logits, batch_x["mask"], annotated=batch_x["annotated"],
                      certain_background=batch_x["certain_background"]))

    def unimatch(mix_source):
        step_cfg = Config({**cfg, "mix_source": mix_source})
        partners = batch_mix if mix_source == "loader" else None
        return lambda: step(unimatch_step(model, batch_x, batch_u, partners, loss_sup, loss_stream,
                                          step_cfg)[0])

    model.train()
    steps = {"supervised": supervised, "loader": unimatch("loader"), "batch": unimatch("batch")}
    # interleaved rounds: a change in the machine's load hits the three alike
    seconds = _interleaved_seconds({name: lambda _, run=run: run() for name, run in steps.items()},
                                   rounds=2 if quick else 3, calls=1)
    report(f"supervised step (AttUNet-16, {batch}×{size}²)", f"{seconds['supervised']:.3f} s")
    for mix_source, partners in (("loader", "a third batch + eval pass"), ("batch", "rolled batch")):
        report(f"UniMatch step ({batch} labeled + {batch} unlabeled, mix_source {mix_source})",
               f"{seconds[mix_source]:.3f} s = {seconds[mix_source] / seconds['supervised']:.2f}× "
               f"the supervised step (CutMix partners: {partners})")


# ==== several processes (torchrun's DDP on the CPU) ====
def _ddp_train_seconds(batch, size, steps):
    """Seconds for `steps` SegFormer-B0 training steps of `batch` images per process, through
    utils.distributed as the training scripts use it (one process: no process group)."""
    from utils import distributed

    cpu = torch.device("cpu")
    distributed.start(cpu, timeout_minutes=5)
    torch.manual_seed(0)
    forward = distributed.data_parallel(build_model("segformer_b0", num_classes=15), cpu)
    optimizer = torch.optim.AdamW(forward.parameters(), lr=1e-4)
    images, masks = torch.randn(batch, 1, size, size), torch.randint(0, 15, (batch, size, size))

    def step():
        loss = forward(lambda model: F.cross_entropy(model(images), masks))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    distributed.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    distributed.barrier()
    seconds = time.perf_counter() - started
    distributed.stop()
    return seconds


def _ddp_worker(rank, world, port, threads, batch, size, steps, results):
    """One of `world` processes, with the environment torchrun would give it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from utils import distributed

    distributed.print_from_main_only()
    torch.set_num_threads(threads)
    seconds = _ddp_train_seconds(batch, size, steps)
    if rank == 0:
        results.put(seconds)


def bench_ddp(report, size=128, global_batch=8, quick=False):
    """1 process × batch G vs 2 gloo processes × G/2 on the CPU, the cores shared out equally:
    the throughput ratio (≤ 1 on a 2-core machine, where the processes only add the gradient
    all-reduce; on a GPU node each process has its own device)."""
    import socket

    import torch.multiprocessing as mp

    if quick:
        size, global_batch = 64, 4
    steps = 2 if quick else 10
    threads = torch.get_num_threads()
    one = _ddp_train_seconds(global_batch, size, steps)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, max(1, threads // 2), global_batch // 2, size,
                                          steps, results), nprocs=2, start_method="spawn")
    two = results.get()
    report(f"DDP, SegFormer-B0 train steps at {size}², global batch {global_batch}",
           f"1 process {global_batch * steps / one:.1f} img/s, 2 gloo processes "
           f"{global_batch * steps / two:.1f} img/s: ratio {one / two:.2f}")


def report(name, text):
    print(f"{name:<58} {text}", flush=True)


ENTRIES = ["csv", "metrics", "pipeline", "loading", "networks", "gpu_options", "unimatch", "ddp"]


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check every entry runs")
    parser.add_argument("--only", nargs="+", choices=ENTRIES, default=ENTRIES)
    parser.add_argument("--networks", nargs="+", choices=sorted({name for name, _ in BENCH_MODELS}),
                        help="the networks entry measures only these (default: all)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    started = time.perf_counter()
    if "csv" in args.only:
        with tempfile.TemporaryDirectory() as folder:
            bench_csv(report, folder, quick=args.quick)
    if "metrics" in args.only:
        bench_metrics(report, quick=args.quick)
    if "pipeline" in args.only:
        bench_pipeline(report, quick=args.quick)
    if "loading" in args.only:
        bench_loading(report, quick=args.quick)
    if "networks" in args.only:
        bench_networks(report, quick=args.quick, names=args.networks)
    if "gpu_options" in args.only:
        bench_gpu_options(report, quick=args.quick)
    if "unimatch" in args.only:
        bench_unimatch_step(report, quick=args.quick)
    if "ddp" in args.only:
        bench_ddp(report, quick=args.quick)
    print(f"bench done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
