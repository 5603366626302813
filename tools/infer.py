#!/usr/bin/env python
"""Run a trained model on images or folders: COCO results JSON + rendered images.

    python tools/infer.py CONFIG --checkpoint model_final.safetensors --input img.jpg folder/ --output out/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the model's YAML config (the one written next to the checkpoint works)")
    p.add_argument("opts", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--checkpoint", required=True, help="weights: ours (.safetensors/.pth) or torchvision's")
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    p.add_argument("--output", required=True, help="folder for results.json and vis/")
    p.add_argument("--score-thresh", type=float, default=0.5, help="drawing threshold (results keep all)")
    p.add_argument("--num-classes", type=int, help="foreground classes, if the config has none and no dataset")
    p.add_argument("--class-names", help="JSON list of names (background first) or a COCO annotations file")
    p.add_argument("--batch-size", type=int, default=2)
    a = p.parse_intermixed_args(argv)

    import segmentation  # noqa: F401  (registers the instance / semantic / panoptic tasks)
    from detection.config import load_config
    from detection.convert import load_detector_weights
    from detection.engine.launch import get_task
    from detection.inference import run_inference
    from resnet_det.common import resolve_device

    try:
        cfg = load_config(a.config, a.opts)
        names, label_to_cat = None, None
        if a.class_names:
            data = json.loads(Path(a.class_names).read_text())
            if isinstance(data, dict) and "categories" in data:
                cats = sorted(data["categories"], key=lambda c: c["id"])
                names = ["background"] + [c["name"] for c in cats]
                label_to_cat = {i + 1: c["id"] for i, c in enumerate(cats)}
            else:
                names = list(data)
        num_classes = cfg.model.num_classes or a.num_classes or (len(names) - 1 if names else None)
        if num_classes is None:
            from detection.engine.launch import build_dataset

            val = build_dataset(cfg, get_task(cfg.model.task), "val")
            num_classes, names, label_to_cat = val.num_classes, val.class_names, val.label_to_cat_id
        model = get_task(cfg.model.task).build_model(cfg.model, num_classes)
        load_detector_weights(model, a.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(cfg.train.device)
    model.to(device)
    try:
        path = run_inference(model, a.input, a.output, device=device, class_names=names, label_to_cat_id=label_to_cat,
                             score_thresh=a.score_thresh, batch_size=a.batch_size, amp=cfg.train.amp)
    except (ValueError, FileNotFoundError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {Path(a.output) / 'vis'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
