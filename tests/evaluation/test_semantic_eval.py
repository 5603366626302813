"""SemSegEvaluator: confusion matrix, mIoU / pAcc / mAcc arithmetic, ignore index, errors, PNG, the protocol."""

from __future__ import annotations

import json
import math

import evalhelpers as H
import numpy as np
import pytest
import torch

from resnet_det.evaluation import SemSegEvaluator


def _feed(ev: SemSegEvaluator, preds, targets) -> None:
    """process() as the evaluation loop calls it: targets as inputs, predictions as outputs."""
    ev.process([{"sem_seg": t} for t in targets], [{"sem_seg": p} for p in preds])


def _metrics(ev: SemSegEvaluator) -> dict[str, float]:
    results = ev.evaluate()
    assert list(results) == ["sem_seg"]
    return results["sem_seg"]


def test_perfect_prediction_gives_miou_one(capsys):
    _, target = H.semseg_batch(seed=3, num_classes=5)
    pred = target.clone()
    pred[pred == 255] = 0  # whatever is predicted on ignored pixels does not matter
    ev = SemSegEvaluator(5)
    _feed(ev, pred, target)
    m = _metrics(ev)
    assert m["mIoU"] == 1.0 and m["pAcc"] == 1.0 and m["mAcc"] == 1.0 and m["fwIoU"] == 1.0
    assert all(m[f"IoU-{c}"] == 1.0 for c in range(5))
    assert "mIoU=1.0000" in capsys.readouterr().out


def test_constant_prediction_matches_hand_arithmetic():
    # 4 classes, a 4x4 target: 8 pixels of class 0, 4 of class 1, 2 of class 2, 2 ignored (255),
    # none of class 3. The model predicts class 0 everywhere.
    target = torch.tensor([[0, 0, 0, 0],
                           [0, 0, 0, 0],
                           [1, 1, 1, 1],
                           [2, 2, 255, 255]])  # fmt: skip
    pred = torch.zeros_like(target)
    ev = SemSegEvaluator(4, class_names=["a", "b", "c", "d"])
    _feed(ev, [pred], [target])
    # confusion (rows = GT, cols = pred), ignored pixels left out:
    #   a: [8, 0, 0, 0]   b: [4, 0, 0, 0]   c: [2, 0, 0, 0]   d: [0, 0, 0, 0]
    assert ev.confusion_matrix.tolist() == [[8, 0, 0, 0], [4, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]]
    m = _metrics(ev)
    # IoU_a = TP / (GT + PRED - TP) = 8 / (8 + 14 - 8) = 8/14 = 4/7
    # IoU_b = 0 / (4 + 0 - 0) = 0;  IoU_c = 0 / (2 + 0 - 0) = 0
    # IoU_d: absent from GT and prediction -> NaN, not in the mean
    # mIoU = (4/7 + 0 + 0) / 3 = 4/21
    # measured: 0 on each of the five below (ratios of small integer counts); rel 1e-12 for float rounding
    assert m["IoU-a"] == pytest.approx(4 / 7, rel=1e-12)
    assert m["IoU-b"] == 0.0 and m["IoU-c"] == 0.0
    assert math.isnan(m["IoU-d"])
    assert m["mIoU"] == pytest.approx(4 / 21, rel=1e-12)
    # pAcc = correct / counted pixels = 8 / 14 = 4/7 (the 2 ignored pixels are not counted)
    assert m["pAcc"] == pytest.approx(4 / 7, rel=1e-12)
    # Acc_a = 8/8 = 1, Acc_b = 0/4 = 0, Acc_c = 0/2 = 0, Acc_d undefined -> mAcc = 1/3
    assert m["mAcc"] == pytest.approx(1 / 3, rel=1e-12)
    assert math.isnan(m["Acc-d"])
    # fwIoU = (8/14) * 4/7 + (4/14) * 0 + (2/14) * 0 = 16/49
    assert m["fwIoU"] == pytest.approx(16 / 49, rel=1e-12)


def test_ignore_index_is_excluded():
    pred, target = H.semseg_batch(seed=0, num_classes=5)
    assert (target == 255).sum() > 0
    a = SemSegEvaluator(5)
    _feed(a, pred, target)
    other = pred.clone()
    other[target == 255] = (other[target == 255] + 1) % 5  # change predictions only on ignored pixels
    b = SemSegEvaluator(5)
    _feed(b, other, target)
    assert torch.equal(a.confusion_matrix, b.confusion_matrix)
    assert a.confusion_matrix.sum() == (target != 255).sum()
    # a custom ignore index is honoured too
    c = SemSegEvaluator(5, ignore_index=-1)
    _feed(c, pred, torch.where(target == 255, -1, target))
    assert torch.equal(a.confusion_matrix, c.confusion_matrix)


def test_bincount_matrix_equals_a_plain_count_and_lists_equal_batches():
    pred, target = H.semseg_batch(seed=7, num_classes=5, n=4)
    ev = SemSegEvaluator(5)
    _feed(ev, pred, target)
    expected = np.zeros((5, 5), np.int64)
    t, p = target.numpy().ravel(), pred.numpy().ravel()
    keep = t != 255
    np.add.at(expected, (t[keep], p[keep]), 1)
    assert ev.confusion_matrix.numpy().tolist() == expected.tolist()
    as_list = SemSegEvaluator(5)
    _feed(as_list, list(pred), [x.numpy() for x in target])
    assert torch.equal(as_list.confusion_matrix, ev.confusion_matrix)
    ev.reset()
    assert ev.confusion_matrix.sum() == 0


def test_shape_mismatch_raises_naming_index_and_shapes():
    ev = SemSegEvaluator(3)
    preds = [torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, 6, dtype=torch.long)]
    targets = [torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, 5, dtype=torch.long)]
    with pytest.raises(
        ValueError, match=r"prediction 1 has shape \[4, 6\] but its target has shape \[4, 5\]"
    ):
        _feed(ev, preds, targets)


def test_labels_out_of_range_raise_and_logits_are_refused():
    ev = SemSegEvaluator(3)
    ok = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"target 0 has labels \[7\] outside \[0, 3\)"):
        _feed(ev, ok, torch.tensor([[[0, 7], [255, 1]]]))
    with pytest.raises(ValueError, match=r"prediction 0 has labels \[3\] outside \[0, 3\)"):
        _feed(ev, torch.tensor([[[0, 3], [1, 1]]]), ok)
    with pytest.raises(ValueError, match="argmax"):
        _feed(ev, torch.zeros(1, 3, 2, 2), ok)
    with pytest.raises(ValueError, match="integer class labels"):
        _feed(ev, ok.float(), ok)
    with pytest.raises(ValueError, match=r"inputs\[0\] has no 'sem_seg'.*with_semantic=True"):
        ev.process([{"image_id": 1}], [{"sem_seg": ok[0]}])
    with pytest.raises(ValueError, match=r"1 inputs .* but 2 outputs"):
        ev.process([{"sem_seg": ok[0]}], [{"sem_seg": ok[0]}] * 2)
    # a batch whose second image is bad counts nothing, not even its first image
    with pytest.raises(ValueError, match="target 1"):
        _feed(ev, torch.zeros(2, 2, 2, dtype=torch.long), torch.tensor([[[0, 1], [1, 0]], [[0, 9], [0, 0]]]))
    with pytest.raises(ValueError, match="ignore_index 1 is a class label"):
        SemSegEvaluator(3, ignore_index=1)
    assert ev.confusion_matrix.sum() == 0  # nothing was counted from the rejected batches


def test_png_and_json_written(tmp_path):
    pred, target = H.semseg_batch(seed=1, num_classes=5)
    names = ["road", "car", "sky", "tree", "person"]
    ev = SemSegEvaluator(5, class_names=names, output_dir=tmp_path / "out")
    _feed(ev, pred, target)
    m = _metrics(ev)
    png = tmp_path / "out" / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = json.loads((tmp_path / "out" / "sem_seg_metrics.json").read_text())
    assert report["metrics"]["mIoU"] == m["mIoU"] and 0.3 < m["mIoU"] < 0.9
    assert report["confusion_matrix"] == ev.confusion_matrix.tolist()
    assert set(f"IoU-{n}" for n in names) <= m.keys()


def test_nothing_processed_gives_nan_and_a_warning():
    ev = SemSegEvaluator(3)
    with pytest.warns(UserWarning, match="no \\(non-ignored\\) pixel"):
        m = _metrics(ev)
    assert math.isnan(m["mIoU"]) and math.isnan(m["pAcc"])
