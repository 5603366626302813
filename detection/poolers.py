"""RoI pooling over one or several feature levels (FPN level mapping of Lin et al., eq. 1)."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

_EXECUTOR: tuple[int, ThreadPoolExecutor] | None = None
_EXECUTOR_LOCK = threading.Lock()
# Below this many boxes per chunk, a thread hand-off costs more than it saves.
_MIN_BOXES_PER_CHUNK = 32
_OPENMP_PIN: list[Callable[[], bool] | None] = []  # empty until searched


def _find_openmp_pin() -> Callable[[], bool] | None:
    """A function that limits the calling thread's OpenMP team to itself, or None where that is not possible.

    A pool thread that runs torch ops gets an OpenMP team of its own (one more thread per core), and those
    extra threads then compete with the main thread's: measured on the 2-core CPU (2026-11-27), the main job's
    convolutions and norms ran at half speed (inference 65 vs 35 ms per image, a training step 377 vs 294 ms).
    `omp_set_num_threads` is per thread, and torch's `get_num_threads` reads the calling thread's value, so the
    pin is checked in a probe thread: if torch does not use the OpenMP runtime found here, nothing is threaded.
    """
    import ctypes
    import glob
    import os

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in [*sorted(glob.glob(os.path.join(lib_dir, "libgomp*.so*"))), "libgomp.so.1"]:
        try:
            set_threads = ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue

        def pin(set_threads=set_threads) -> bool:
            torch.get_num_threads()  # torch's lazy per-thread set-up first, so that it does not undo the pin
            set_threads(1)
            return torch.get_num_threads() == 1

        works: list[bool] = []
        probe = threading.Thread(target=lambda pin=pin, works=works: works.append(pin()))
        probe.start()
        probe.join()
        if works == [True]:
            return pin
    return None


def _openmp_pin() -> Callable[[], bool] | None:
    """`_find_openmp_pin()`, searched once per process; None: CPU pooling stays on the calling thread."""
    with _EXECUTOR_LOCK:
        if not _OPENMP_PIN:
            _OPENMP_PIN.append(_find_openmp_pin())
        return _OPENMP_PIN[0]


def _executor(workers: int) -> ThreadPoolExecutor:
    """One process-wide pool, rebuilt when `torch.set_num_threads` changed the thread count; each of its threads
    runs torch ops on itself only (no OpenMP team of its own)."""
    global _EXECUTOR
    pin = _openmp_pin()
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR[0] != workers:
            if _EXECUTOR is not None:
                _EXECUTOR[1].shutdown(wait=False)
            _EXECUTOR = (workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roi_pool",
                                                     initializer=pin))
        return _EXECUTOR[1]


def to_contiguous_nchw(x: Tensor) -> Tensor:
    """`x` `(N, C, H, W)` in the contiguous (NCHW) layout that torchvision's RoI kernels read.

    A channels-last map is transposed image by image as a `(H*W, C)` matrix: PyTorch's 2-D transpose copy
    is about 3x faster on CPUs than the generic strided copy of `x.contiguous()` (it dominated the
    conversion of P2 before pooling at inference)."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last) or x.dim() != 4:
        return x.contiguous()
    n, c, h, w = x.shape
    out = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device)
    for i in range(n):
        out[i].view(c, h * w).copy_(x[i].permute(1, 2, 0).reshape(h * w, c).t())
    return out


def _channel_chunks(channels: int, workers: int) -> list[tuple[int, int]]:
    bounds = [round(i * channels / workers) for i in range(workers + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


class _ChannelParallelRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign, forward and backward, on channel slices spread over threads (CPU training).

    torchvision's CPU kernels run on one core, and its backward (scattering into the feature gradient)
    cannot be split by boxes without races; channels are independent in both directions, so each thread
    takes a slice of them: the same arithmetic per channel, hence the same values, on every core."""

    @staticmethod
    def forward(ctx, x: Tensor, rois: Tensor, output_size: int, scale: float, sampling_ratio: int,
                aligned: bool) -> Tensor:
        workers = torch.get_num_threads()
        n, c, h, w = x.shape
        # The kernel makes its input contiguous: a channel slice of a channels-last map would be gathered with a
        # slow strided copy in every thread; one fast transpose to NCHW first (see `to_contiguous_nchw`).
        x = to_contiguous_nchw(x)
        out = x.new_empty((rois.shape[0], c, output_size, output_size))

        def job(c0: int, c1: int) -> None:
            with torch.no_grad():  # grad mode is per thread
                out[:, c0:c1] = torch.ops.torchvision.roi_align(x[:, c0:c1], rois, scale, output_size, output_size,
                                                                sampling_ratio, aligned)

        for f in [_executor(workers).submit(job, a, b) for a, b in _channel_chunks(c, workers)]:
            f.result()
        ctx.save_for_backward(rois)
        ctx.geometry = (n, c, h, w, output_size, scale, sampling_ratio, aligned)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        n, c, h, w, size, scale, sampling_ratio, aligned = ctx.geometry
        grad_x = grad.new_empty((n, c, h, w))
        workers = torch.get_num_threads()

        def job(c0: int, c1: int) -> None:
            with torch.no_grad():
                grad_x[:, c0:c1] = torch.ops.torchvision._roi_align_backward(
                    grad[:, c0:c1].contiguous(), rois, scale, size, size, n, c1 - c0, h, w, sampling_ratio, aligned)

        for f in [_executor(workers).submit(job, a, b) for a, b in _channel_chunks(c, workers)]:
            f.result()
        return grad_x, None, None, None, None, None


class RoIPooler(nn.Module):
    """Pool `(K, 4)` boxes from the feature level that fits their size.

    Args:
        strides: stride of each input level (from the backbone's `output_shape()`), high to low resolution.
        output_size: side of the pooled map (7 for box heads, 14 for mask heads and C4's res5).
        sampling_ratio: RoIAlign samples per bin (0 = adaptive).
        pooler_type: "roi_align" (default), "roi_align_v2" (aligned, half-pixel offset) or "roi_pool"
            (the original Fast R-CNN max pooling).
        canonical_box_size / canonical_level: a 224-pixel box maps to level 4 (P4 / res4).

    Boxes are mapped with `floor(k0 + log2(sqrt(area) / 224) + 1e-6)` clamped to the available levels,
    the torchvision/Detectron rule. Pooling runs in fp32 whatever the features' dtype (autocast-safe:
    RoIAlign has no half kernel on every device), in float64 for float64 features, and returns
    `(K, C, output_size, output_size)`.
    """

    def __init__(self, strides: Sequence[int], output_size: int, *, sampling_ratio: int = 2,
                 pooler_type: str = "roi_align", canonical_box_size: int = 224, canonical_level: int = 4) -> None:
        super().__init__()
        if pooler_type not in ("roi_align", "roi_align_v2", "roi_pool"):
            raise ValueError(f"pooler_type={pooler_type!r}; use 'roi_align', 'roi_align_v2' or 'roi_pool'")
        self.scales = [1.0 / s for s in strides]
        levels = [math.log2(s) for s in strides]
        if any(abs(lv - round(lv)) > 1e-6 for lv in levels):
            raise ValueError(f"pooler strides must be powers of two, got {tuple(strides)}")
        self.min_level, self.max_level = round(levels[0]), round(levels[-1])
        if len(strides) > 1 and self.max_level - self.min_level + 1 != len(strides):
            raise ValueError(f"pooler strides must double level to level, got {tuple(strides)}")
        self.output_size, self.sampling_ratio, self.pooler_type = output_size, sampling_ratio, pooler_type
        self.canonical_box_size, self.canonical_level = canonical_box_size, canonical_level

    def level_of(self, boxes: Tensor) -> Tensor:
        """Index (0-based, into the input levels) of the level each `(K, 4)` box is pooled from."""
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        lvl = torch.floor(self.canonical_level + torch.log2(torch.sqrt(area) / self.canonical_box_size) + 1e-6)
        # A non-finite box (a diverged model) must still map to a valid level rather than crash the grouping.
        lvl = torch.nan_to_num(lvl, nan=float(self.min_level))
        return (lvl.clamp(self.min_level, self.max_level) - self.min_level).to(torch.int64)

    def _use_cpu_threads(self, feats: Sequence[Tensor], rois: Tensor) -> bool:
        """torchvision's CPU RoIAlign/RoIPool kernels run on one core; at inference (nothing to
        differentiate) chunks of boxes are pooled on `torch.get_num_threads()` threads instead."""
        if (rois.device.type != "cpu" or torch.get_num_threads() < 2 or rois.shape[0] < 2 * _MIN_BOXES_PER_CHUNK
                or _openmp_pin() is None):
            return False
        return not (torch.is_grad_enabled() and (rois.requires_grad or any(f.requires_grad for f in feats)))

    def _pool_threaded(self, groups: list[tuple[Tensor, Tensor, Tensor, float]]) -> list[tuple[Tensor, Tensor]]:
        """`_pool` of every group, in chunks of boxes spread over `torch.get_num_threads()` threads."""
        workers = torch.get_num_threads()
        pool_threads = _executor(workers)
        inference = torch.is_inference_mode_enabled()

        def pool(x: Tensor, r: Tensor, scale: float) -> Tensor:
            with torch.inference_mode(inference), torch.no_grad():  # grad mode is per thread
                return self._pool(x, r, scale)

        jobs = []
        for x, r, idx, scale in groups:
            n_chunks = max(1, min(workers, r.shape[0] // _MIN_BOXES_PER_CHUNK))
            for rc, ic in zip(r.tensor_split(n_chunks), idx.tensor_split(n_chunks)):
                if rc.shape[0]:
                    jobs.append((ic, pool_threads.submit(pool, x, rc, scale)))
        return [(idx, job.result()) for idx, job in jobs]

    def _pool(self, x: Tensor, rois: Tensor, scale: float) -> Tensor:
        if self.pooler_type == "roi_pool":
            return roi_pool(x, rois, self.output_size, scale)
        aligned = self.pooler_type == "roi_align_v2"
        if (x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad and torch.get_num_threads() > 1
                and rois.shape[0] >= 2 * _MIN_BOXES_PER_CHUNK and x.dim() == 4 and x.shape[1] > 1
                and not torch.compiler.is_compiling() and _openmp_pin() is not None):
            return _ChannelParallelRoIAlign.apply(x, rois, self.output_size, scale, self.sampling_ratio, aligned)
        return roi_align(x, rois, self.output_size, scale, self.sampling_ratio, aligned=aligned)

    def forward(self, features: Sequence[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        """Args:
            features: one `(N, C, H, W)` map per level.
            boxes: `(K, 4)` xyxy in input-image pixels.
            batch_index: `(K,)` image of each box.
        """
        # fp32 whatever the features' dtype (half maps under autocast), float64 kept for a `model.double()`.
        dtype = torch.float64 if any(f.dtype == torch.float64 for f in features) else torch.float32
        rois = torch.cat([batch_index.to(boxes.dtype)[:, None], boxes], dim=1).to(dtype)
        # torchvision's CPU roi_align dies by SIGSEGV on one NaN or +inf coordinate: such a box (only a diverged
        # model makes one; the RPN already drops and zeroes its non-finite proposals) is pooled as the empty box
        # at the origin instead. One elementwise op, no host synchronisation.
        rois = torch.where(torch.isfinite(rois), rois, torch.zeros_like(rois))
        feats = [f.to(dtype) for f in features]
        if rois.device.type == "cpu" and not (torch.is_grad_enabled() and any(f.requires_grad for f in feats)):
            # torchvision's CPU kernels read NCHW: convert here, once and fast, not inside every call (or worker)
            feats = [to_contiguous_nchw(f) for f in feats]
        threaded = self._use_cpu_threads(feats, rois)
        if len(feats) == 1 and not threaded:
            return self._pool(feats[0], rois, self.scales[0])
        if len(feats) == 1:
            groups = [(feats[0], rois, torch.arange(rois.shape[0], device=rois.device), self.scales[0])]
        else:
            # Group the boxes by level: the group sizes are data-dependent, so they are read back once (one
            # host sync for all levels), the price of not pooling every box from every level.
            levels = self.level_of(rois[:, 1:])
            order = levels.argsort(stable=True)
            counts = torch.bincount(levels, minlength=len(feats)).tolist()
            groups = list(zip(feats, rois[order].split(counts), order.split(counts), self.scales))
        if threaded:
            pooled = self._pool_threaded(groups)
        else:
            pooled = [(idx, self._pool(x, r, scale)) for x, r, idx, scale in groups]
        out = pooled[0][1].new_empty((rois.shape[0], *pooled[0][1].shape[1:]))
        for idx, p in pooled:  # scattered straight into place, no concatenation (index_put_: ~4x index_copy_ on CPU)
            out.index_put_((idx,), p)
        return out
