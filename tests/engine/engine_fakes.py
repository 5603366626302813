"""Models and loaders of the engine tests: the real tiny detector (:class:`TinyDetector`), a detector-shaped
fake (:class:`FakeDetector`, left for tests/engine/test_cuda.py's bitwise CUDA checks, where the model does not
matter) and an endless, resumable loader."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def with_options(kw: dict[str, Any]) -> dict[str, Any]:
    """Trainer keyword arguments from flat ones: the :class:`~resnet_det.engine.TrainerOptions` fields among ``kw``
    (log_period, eval_fn, progress, ...) go into ``options=``, the rest (amp, ema, ...) stay as they are. For
    the test helpers that take both kinds in one ``**kw``."""
    from resnet_det.engine import TrainerOptions

    names = {f.name for f in dataclasses.fields(TrainerOptions)}
    options = {k: v for k, v in kw.items() if k in names}
    return {**{k: v for k, v in kw.items() if k not in names}, "options": TrainerOptions(**options)}


class FakeDetector(nn.Module):
    """A small conv net with the torchvision detector interface, returning two losses.

    Uses torch (dropout), Python and NumPy randomness in its losses, so a resume that forgets any
    RNG state changes the losses. Records what it saw, for the tests.

    Args:
        num_classes: Classes of the fake classification loss.
        nan_at: 1-based call number at which `loss_box_reg` becomes NaN.
        sigint_at: 1-based call number during which the process sends itself SIGINT.
        interrupt_at: 1-based call number that raises KeyboardInterrupt from inside the forward.
        stochastic: Use dropout and Python/NumPy random jitter (off for gradient comparisons).
    """

    def __init__(
        self,
        num_classes: int = 3,
        *,
        nan_at: int | None = None,
        sigint_at: int | None = None,
        interrupt_at: int | None = None,
        stochastic: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.cls = nn.Linear(8, num_classes)
        self.box = nn.Linear(8, 4)
        self.nan_at = nan_at
        self.sigint_at = sigint_at
        self.interrupt_at = interrupt_at
        self.stochastic = stochastic
        self.calls = 0
        self.seen_ids: list[list[int]] = []
        self.autocast_dtypes: list[torch.dtype] = []

    def features(self, images: list[Tensor]) -> Tensor:
        # Images may differ in size: pool each to a vector, as a detector pools RoIs.
        feats = [F.relu(self.norm(self.conv(img[None]))).mean(dim=(2, 3)) for img in images]
        return torch.cat(feats)

    def forward(self, images: list[Tensor], targets: list[dict[str, Any]] | None = None) -> Any:
        feats = self.features(images)
        if not self.training:
            return [{"scores": s.softmax(-1).max(), "labels": s.argmax()} for s in self.cls(feats)]
        self.calls += 1
        self.autocast_dtypes.append(self.conv(images[0][None]).dtype)
        self.seen_ids.append([int(t["image_id"]) for t in targets])
        if self.sigint_at == self.calls:
            os.kill(os.getpid(), signal.SIGINT)
        if self.interrupt_at == self.calls:
            raise KeyboardInterrupt
        feats = F.dropout(feats, p=0.2, training=self.stochastic)
        labels = torch.stack([t["labels"][0] for t in targets])
        boxes = torch.stack([t["boxes"].float().mean(0) for t in targets]) / 32.0
        jitter = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand()) if self.stochastic else 1.0
        loss_cls = F.cross_entropy(self.cls(feats).float(), labels) * jitter
        loss_box = F.smooth_l1_loss(self.box(feats).float(), boxes)
        if self.nan_at == self.calls:
            loss_box = loss_box * float("nan")
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}


# The real detector of the engine tests: ResNet-18 FPN Faster R-CNN, width 8, GroupNorm (trainable from scratch),
# 64-px inputs, small RPN / RoI sample sizes: ~0.12 s a training step of 2 images on one core.
TINY_SPEC: dict[str, Any] = dict(
    num_classes=3, backbone_name="resnet18", backbone_width=8, backbone_norm="GN", freeze_at=0, fpn_channels=16,
    fc_dim=32, min_size=(64,), max_size=64, test_min_size=64, test_max_size=64, rpn_batch_size_per_image=64,
    roi_batch_size_per_image=32, rpn_pre_nms_topk=(200, 100), rpn_post_nms_topk=(100, 50), detections_per_img=20)


class TinyDetector(nn.Module):
    """The real Faster R-CNN (:data:`TINY_SPEC`: every part of the detector, sampling included) with the
    probes of the trainer tests around it.

    The detector is ``self.detector``, built by the constructor (seed before it for equal weights). Around
    its training forward: a random horizontal flip and brightness jitter drawn from Python's and NumPy's
    generators (as a data augmentation would; so a resume that forgets those RNG states changes the run, as
    one that forgets torch's does through the RPN and RoI samplers), and the faults: SIGINT sent to the
    process, a ``KeyboardInterrupt`` raised, or ``loss_box_reg`` multiplied by NaN at a given call (a loss
    that overflowed; the detector's own computation is unchanged). Records the image ids it trained on and
    the dtype of the backbone's output (autocast).

    Args:
        nan_at / sigint_at / interrupt_at: 1-based training call of each fault (None: never).
        augment: flip and jitter (off for gradient comparisons).
    """

    def __init__(self, *, nan_at: int | None = None, sigint_at: int | None = None,
                 interrupt_at: int | None = None, augment: bool = True) -> None:
        super().__init__()
        from detection.models import build_faster_rcnn

        self.detector = build_faster_rcnn(**TINY_SPEC)
        self.nan_at = nan_at
        self.sigint_at = sigint_at
        self.interrupt_at = interrupt_at
        self.augment = augment
        self.calls = 0
        self.seen_ids: list[list[int]] = []
        self.autocast_dtypes: list[torch.dtype] = []
        self._dtype_seen: list[torch.dtype] = []
        self.detector.backbone.register_forward_hook(
            lambda m, i, o: self._dtype_seen.append(next(iter(o.values())).dtype))

    def _augment(self, images: list[Tensor], targets: list[dict[str, Any]]) -> tuple[list[Tensor], list[dict]]:
        out_images, out_targets = [], []
        for img, t in zip(images, targets):
            t = dict(t)
            if random.random() < 0.5:
                w = img.shape[-1]
                img = img.flip(-1)
                t["boxes"] = torch.stack([w - t["boxes"][:, 2], t["boxes"][:, 1], w - t["boxes"][:, 0],
                                          t["boxes"][:, 3]], dim=1)
            out_images.append((img * (0.9 + 0.2 * float(np.random.rand()))).clamp(0, 1))
            out_targets.append(t)
        return out_images, out_targets

    def forward(self, images: list[Tensor], targets: list[dict[str, Any]] | None = None) -> Any:
        if not self.training:
            return self.detector(images)
        self.calls += 1
        self.seen_ids.append([int(t["image_id"]) for t in targets])
        if self.sigint_at == self.calls:
            os.kill(os.getpid(), signal.SIGINT)
        if self.interrupt_at == self.calls:
            raise KeyboardInterrupt
        if self.augment:
            images, targets = self._augment(images, targets)
        self._dtype_seen.clear()
        losses = self.detector(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        self.autocast_dtypes.append(self._dtype_seen[0])
        if self.nan_at == self.calls:
            losses = {**losses, "loss_box_reg": losses["loss_box_reg"] * float("nan")}
        return losses


def make_batch(index: int, batch_size: int, *, seed: int = 0, size: int = 24, first_label: int = 0,
               box_fraction: float = 0.25) -> tuple[list[Tensor], list[dict]]:
    """Batch `index` of an endless deterministic stream (image ids index*batch_size + i): random images of
    `size` x `size`..`size + 7` px with one square box of `box_fraction * size` px each, labels
    `first_label`..+2."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    images, targets = [], []
    for i in range(batch_size):
        h = size + int(torch.randint(0, 8, (1,), generator=g))
        images.append(torch.rand(3, h, size, generator=g))
        xy = torch.rand(2, generator=g) * (size * min(0.5, 1 - box_fraction))
        box = torch.cat([xy, xy + size * box_fraction]).reshape(1, 4)
        targets.append({
            "boxes": box,
            "labels": torch.randint(0, 3, (1,), generator=g) + first_label,
            "image_id": index * batch_size + i,
        })
    return images, targets


class FakeLoader:
    """Endless loader whose batches depend only on their position; state = batches consumed."""

    def __init__(self, batch_size: int = 2, *, seed: int = 0, size: int = 24, first_label: int = 0,
                 box_fraction: float = 0.25) -> None:
        self.batch_size = batch_size
        self.box_fraction = box_fraction
        self.seed = seed
        self.size = size
        self.first_label = first_label
        self.position = 0

    def __iter__(self):
        while True:
            batch = make_batch(self.position, self.batch_size, seed=self.seed, size=self.size,
                               first_label=self.first_label, box_fraction=self.box_fraction)
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def tiny_loader(batch_size: int = 2, *, seed: int = 0) -> FakeLoader:
    """The stream :class:`TinyDetector` trains on: 64-px images (the detector's size), one 32-px box each (the
    smallest anchor's size: positives for the RPN and the RoI head), labels 1..3."""
    return FakeLoader(batch_size, seed=seed, size=64, first_label=1, box_fraction=0.5)


class FixedBatchLoader(FakeLoader):
    """Yields the same batch forever (for gradient comparisons)."""

    def __init__(self, images: list[Tensor], targets: list[dict]) -> None:
        super().__init__(len(images))
        self.batch = (images, targets)

    def __iter__(self):
        while True:
            self.position += 1
            yield self.batch


def ddp_batch() -> tuple[list[Tensor], list[dict]]:
    """The global batch of 4 of the DDP gradient check (two halves of 2)."""
    return make_batch(0, 4, size=64, first_label=1, box_fraction=0.5)


def ddp_worker(rank: int, world_size: int, tmp: str) -> None:
    """One of two gloo processes: collectives, DDP gradients, checkpoint/resume, NaN and time limit on one rank,
    all on the real tiny detector (:class:`TinyDetector`).

    Writes what it observed to `<tmp>/result<rank>.pt` for the test to check.
    """
    import json
    import sys
    from pathlib import Path

    from resnet_det.config import SolverConfig
    from resnet_det.engine import Checkpointer, Trainer, TrainerOptions, build_lr_scheduler, build_optimizer
    from resnet_det_common import (
        all_gather_object,
        all_reduce_dict,
        barrier,
        cleanup,
        get_rank,
        get_world_size,
        init_distributed,
        is_main_process,
        seed_everything,
        wrap_ddp,
    )

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on a 2-core machine
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out: dict[str, Any] = {}
    tmp_path = Path(tmp)
    assert init_distributed("cpu", init_method=f"file://{tmp_path / 'rendezvous'}") == (rank, world_size, rank)
    try:
        out["rank"], out["world"], out["main"] = get_rank(), get_world_size(), is_main_process()
        out["reduced"] = float(all_reduce_dict({"x": torch.tensor(float(rank + 1))})["x"])
        out["gathered"] = all_gather_object({"r": rank})

        # 1. Each process takes half of the global batch of 4; its samplers draw from seed 100 + rank.
        torch.manual_seed(0)
        model = TinyDetector(augment=False)
        images, targets = ddp_batch()
        half = slice(2 * rank, 2 * rank + 2)
        cfg = SolverConfig(lr=0.1, max_iter=10, warmup_iters=0, steps=(100,))
        opt = build_optimizer(model, cfg)
        trainer = Trainer(
            wrap_ddp(model, "cpu"), opt, build_lr_scheduler(opt, cfg), FixedBatchLoader(images[half], targets[half]),
            device="cpu", max_iter=1, output_dir=tmp_path / "grad_run",
            options=TrainerOptions(progress=False, curves=False),
        )
        torch.manual_seed(100 + rank)
        trainer.run_step()
        out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}

        # 2. Train with checkpoints, then resume: per-rank loader and RNG states come back.
        torch.manual_seed(1)
        model = TinyDetector()
        seed_everything(5, rank)  # after the model: each rank's random stream differs
        opt = build_optimizer(model, cfg)
        run = tmp_path / "ckpt_run"
        loader = tiny_loader(seed=rank + 1)
        Trainer(
            wrap_ddp(model, "cpu"), opt, build_lr_scheduler(opt, cfg), loader, device="cpu", max_iter=4,
            output_dir=run, options=TrainerOptions(checkpoint_period=2, log_period=1, progress=False, curves=False),
        ).train()
        state = torch.load(run / "model_final.state.pt", weights_only=True)
        out["saved_loader"] = state["loader"]
        out["rng_differs"] = not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
        model2 = TinyDetector()
        opt2 = build_optimizer(model2, cfg)
        loader2 = tiny_loader(seed=rank + 1)
        t2 = Trainer(
            wrap_ddp(model2, "cpu"), opt2, build_lr_scheduler(opt2, cfg), loader2, device="cpu", max_iter=6,
            output_dir=run, options=TrainerOptions(checkpoint_period=2, log_period=1, progress=False, curves=False),
        )
        start = t2.checkpointer.resume(t2.model, opt2, t2.scheduler, t2.scaler, loader2)
        out["resume_start"] = start
        out["resume_position"] = loader2.position
        out["resume_rng_is_own"] = torch.equal(torch.get_rng_state(), state["rng"][rank]["torch"])
        out["lines"] = [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
            if rank == 0 else None

        # 3. A NaN on rank 1 only stops both processes. At the check of iteration 3 (log_period=3), the NaN's
        # own iteration: DDP averages rank 1's NaN gradients into both models, and a later forward would run
        # on NaN weights.
        barrier()
        torch.manual_seed(2)
        model = TinyDetector(nan_at=3 if rank == 1 else None)
        opt = build_optimizer(model, cfg)
        try:
            Trainer(
                wrap_ddp(model, "cpu"), opt, build_lr_scheduler(opt, cfg), tiny_loader(), device="cpu", max_iter=6,
                output_dir=tmp_path / "nan_run", options=TrainerOptions(log_period=3, progress=False, curves=False),
            ).train()
            out["nan_error"] = None
        except FloatingPointError as err:
            out["nan_error"] = str(err)

        # 4. The time limit is up on rank 1 only: both stop at the same iteration, the next logging
        # all-reduce that carries rank 1's vote, and save the same resumable checkpoint.
        barrier()
        torch.manual_seed(3)
        model = TinyDetector()
        opt = build_optimizer(model, cfg)
        result = Trainer(
            wrap_ddp(model, "cpu"), opt, build_lr_scheduler(opt, cfg), tiny_loader(), device="cpu", max_iter=9,
            output_dir=tmp_path / "time_run",
            options=TrainerOptions(log_period=3, max_time_minutes=1e-9 if rank == 1 else 60.0, progress=False,
                                   curves=False),
        ).train()
        out["time_stop"] = (result["iteration"], result["stopped_early"])
        out["time_checkpoint"] = Checkpointer(tmp_path / "time_run").latest()
    finally:
        torch.save(out, tmp_path / f"result{rank}.pt")
        # An orderly teardown: the DDP reducers go before the process group, and no rank leaves while the
        # other still talks to it (gloo aborts a process whose peer vanished mid-exchange).
        import contextlib
        import datetime
        import gc

        import torch.distributed as dist

        model = model2 = opt = opt2 = trainer = t2 = None
        gc.collect()
        with contextlib.suppress(RuntimeError):  # bounded: a rank that failed elsewhere must not hang the test
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        cleanup()


def nan_child() -> None:
    """``python -c "import engine_fakes; engine_fakes.nan_child()" OUT JSON``: trains :class:`TinyDetector`
    with a NaN loss at call ``nan_at`` in a process of its own and prints one JSON line, the error raised.

    JSON: ``{"nan_at", "max_iter", "log_period", "checkpoint_period", "solver": {SolverConfig fields}}``.
    A child, because the steps after the NaN run the detector on NaN weights until the next check: a native
    crash there (a signal) must fail the test that asked, not end the test session.
    """
    import json
    import sys
    from pathlib import Path

    from resnet_det.config import SolverConfig
    from resnet_det.engine import Trainer, TrainerOptions, build_lr_scheduler, build_optimizer

    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = TinyDetector(nan_at=spec["nan_at"])
    cfg = SolverConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["solver"].items()})
    opt = build_optimizer(model, cfg)
    trainer = Trainer(model, opt, build_lr_scheduler(opt, cfg), tiny_loader(), device="cpu",
                      max_iter=spec["max_iter"], output_dir=out,
                      options=TrainerOptions(progress=False, curves=False, log_period=spec["log_period"],
                                             checkpoint_period=spec["checkpoint_period"]))
    try:
        trainer.train()
        result: dict[str, Any] = {"error": None, "type": None}
    except Exception as err:  # reported to the test, which checks the type and the message
        result = {"error": str(err), "type": type(err).__name__}
    print(json.dumps(result), flush=True)
