"""Distributed evaluation on CPU: 2 gloo ranks started with torch.multiprocessing.spawn."""

from __future__ import annotations

import json
import math
import time

import evalhelpers as H
import pytest
import torch
import torch.multiprocessing as mp

from resnet_det.evaluation import COCOEvaluator, SemSegEvaluator

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def _spawn(fn, args: tuple, nprocs: int, timeout: float = 120.0) -> None:
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish in {timeout:.0f} s")


def test_two_gloo_ranks_give_rank0_the_single_process_metrics(gt_path, gt, tmp_path):
    _spawn(H.dist_worker, (2, str(tmp_path / "init"), str(tmp_path), str(gt_path)), nprocs=2)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())

    # COCO: rank 0 has the metrics of one process that saw every image once; rank 1 gets {}
    ids, outs = H.synthetic_outputs(gt, seed=0)
    single = COCOEvaluator(gt_path, label_to_cat_id=H.label_maps(gt)[0])
    single.process(ids, outs)
    expected = single.evaluate()
    assert 0.1 < expected["bbox"]["AP"] < 0.9
    assert rank0["coco"] == expected  # exact: same detections, de-duplicated image, same COCOeval
    assert rank1["coco"] == {}

    # semantic segmentation: the confusion matrices are summed; rank 0 gets the metrics, rank 1 {}
    sem = SemSegEvaluator(5)
    for rank in (0, 1):
        pred, target = H.semseg_batch(seed=rank)
        sem.process([{"sem_seg": t} for t in target], [{"sem_seg": p} for p in pred])
    sem_expected = sem.evaluate()["sem_seg"]
    assert rank0["local_cm"] != rank1["local_cm"]  # each rank really saw different pixels
    got = rank0["sem"]["sem_seg"]
    assert got.keys() == sem_expected.keys()
    for k, v in sem_expected.items():
        # measured: 0: the gathered confusion matrix is the same integers, so the metrics are bit-equal
        assert (math.isnan(v) and math.isnan(got[k])) or got[k] == v, k
    assert rank1["sem"] == {}
    # the list evaluator: every rank calls every evaluator (they gather); rank 0 gets both keys, rank 1 none
    assert rank0["both_keys"] == ["bbox", "sem_seg"] and rank1["both_keys"] == []
    assert torch.equal(
        torch.tensor(rank0["local_cm"]) + torch.tensor(rank1["local_cm"]), sem.confusion_matrix
    )


@pytest.mark.slow
def test_four_gloo_ranks_evaluate_from_shards_equal_to_one_process(gt_path, gt, tmp_path):
    _spawn(H.dist_shard_worker, (4, str(tmp_path / "init"), str(tmp_path), str(gt_path)), nprocs=4, timeout=300)
    reports = [json.loads((tmp_path / f"shard_rank{r}.json").read_text()) for r in range(4)]

    ids, outs = H.synthetic_outputs(gt, seed=0, with_masks=True)
    single = COCOEvaluator(gt_path, iou_types=("bbox", "segm"), label_to_cat_id=H.label_maps(gt)[0])
    single.process(ids, outs)
    expected = single.evaluate()
    assert 0.1 < expected["bbox"]["AP"] < 0.9 and 0.1 < expected["segm"]["AP"] < 0.9
    # exact: the same detections in the same order (by image id), the repeated image counted once
    assert reports[0]["metrics"] == expected
    assert all(r["metrics"] == {} for r in reports[1:])
    assert sum(r["images"] for r in reports) == len(ids) + 1
    # the predictions travelled through the shards: the only gathered object is rank 0's short token
    for r in reports:
        assert len(r["gathered"]) == 1 and len(r["gathered"][0]) < 64
    assert reports[0]["gathered"][0] != "None" and all(r["gathered"][0] == "None" for r in reports[1:])
    # rank 0 removed the shards; the outputs are its own
    out = tmp_path / "eval"
    assert not (out / "shards").exists()
    assert (out / "metrics.json").is_file() and (out / "coco_instances_results.json").is_file()
