"""Anchor generation: per-level sizes and aspect ratios, cached per feature size and device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """Anchors for each feature level, in the (H, W, A) order the RPN head flattens its outputs in.

    Args:
        sizes: per level, the anchor sizes (sqrt of area, pixels), e.g. ((32,), (64,), ...) for an FPN
            or ((32, 64, 128, 256, 512),) for a C4 model.
        aspect_ratios: h/w ratios, shared by all levels or one tuple per level.
        strides: per level, the feature stride (from the backbone's `output_shape()`).
        torchvision_strides: derive each level's stride as `padded_image_side // feature_side`, as
            torchvision does (it differs from the declared stride on levels whose side was rounded up,
            e.g. P6 of a 480-pixel input: 480 // 8 = 60, not 64). Used by the torchvision presets so
            converted checkpoints see exactly the anchors they were trained with.

    The base anchors are rounded to integers as in torchvision, so converted models see identical
    anchors; anchors are cached per (level sizes, device, dtype).
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float] | Sequence[Sequence[float]],
                 strides: Sequence[int], *, torchvision_strides: bool = False) -> None:
        super().__init__()
        sizes = [tuple(float(s) for s in level) for level in sizes]
        if aspect_ratios and not isinstance(aspect_ratios[0], Sequence):
            aspect_ratios = [tuple(float(a) for a in aspect_ratios)] * len(sizes)  # type: ignore[arg-type]
        ratios = [tuple(float(a) for a in level) for level in aspect_ratios]  # type: ignore[union-attr]
        if len(sizes) != len(strides) or len(ratios) != len(sizes):
            raise ValueError(f"anchor sizes ({len(sizes)} levels), aspect ratios ({len(ratios)}) and feature strides "
                             f"({len(strides)}) must have one entry per feature level")
        for level in sizes + ratios:
            if not level or any(v <= 0 for v in level):
                raise ValueError(f"anchor sizes and aspect ratios must be positive and non-empty, got {level}")
        self.sizes, self.aspect_ratios, self.strides = sizes, ratios, [int(s) for s in strides]
        self.torchvision_strides = torchvision_strides
        self.cell_anchors = [self._cell_anchors(s, r) for s, r in zip(sizes, ratios)]
        self._cache: dict[tuple, list[Tensor]] = {}

    @staticmethod
    def _cell_anchors(sizes: tuple[float, ...], ratios: tuple[float, ...]) -> Tensor:
        scales = torch.as_tensor(sizes, dtype=torch.float32)
        ar = torch.as_tensor(ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ar)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    @property
    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def forward(self, grid_sizes: Sequence[tuple[int, int]], device: torch.device,
                dtype: torch.dtype = torch.float32, image_size: tuple[int, int] | None = None) -> list[Tensor]:
        """Anchors per level, each `(H*W*A, 4)`, for feature maps of the given `(H, W)` sizes
        (`image_size`, the padded batch's `(H, W)`, is needed with `torchvision_strides`)."""
        if self.torchvision_strides:
            if image_size is None:
                raise ValueError("torchvision_strides needs the padded image size")
            strides = [(image_size[0] // g[0], image_size[1] // g[1]) for g in grid_sizes]
        else:
            strides = [(s, s) for s in self.strides]
        key = (tuple(tuple(g) for g in grid_sizes), tuple(strides), str(device), dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        out = []
        for (gh, gw), (sh, sw), base in zip(grid_sizes, strides, self.cell_anchors):
            shifts_x = torch.arange(0, gw, dtype=torch.int32, device=device) * sw
            shifts_y = torch.arange(0, gh, dtype=torch.int32, device=device) * sh
            sy, sx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)
            anchors = (shifts.view(-1, 1, 4) + base.to(device).view(1, -1, 4)).reshape(-1, 4)
            out.append(anchors.to(dtype))
        if len(self._cache) > 64:  # many input sizes (multi-scale eval): keep memory bounded
            self._cache.clear()
        self._cache[key] = out
        return out
