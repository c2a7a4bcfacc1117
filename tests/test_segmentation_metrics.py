"""Segmentation / classification metrics on hand-made masks with known answers."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from metrics.segmentation import (
    balanced_accuracy,
    binarize,
    confusion_matrix,
    dice_iou,
    false_positive,
    hd95,
    segmentation_records,
    summarize,
)


def square(h=32, w=32, top=8, left=8, size=10):
    m = np.zeros((h, w), dtype=bool)
    m[top:top + size, left:left + size] = True
    return m


def brute_force_hd95(p, g):
    """Reference: surface pixels by 4-neighbourhood (border = background), all pairwise distances."""
    def surface(m):
        pad = np.pad(m, 1)
        inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        return np.argwhere(m & ~inner)
    sp, sg = surface(p), surface(g)
    d = cdist(sp, sg)
    return np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95)


def test_identical_and_disjoint():
    g = square()
    dice, iou = dice_iou(np.stack([g, g]), np.stack([g, np.roll(g, 15, axis=1)]))
    assert dice[0] == 1.0 and iou[0] == 1.0
    assert dice[1] == 0.0 and iou[1] == 0.0
    assert hd95(g, g)[0] == 0.0


def test_half_overlap_known_values():
    g = square(left=0)
    p = square(left=5)  # 10x10 squares overlapping in 10x5 pixels
    dice, iou = dice_iou(p, g)
    assert dice[0] == pytest.approx(0.5)  # 2*50 / (100+100)
    assert iou[0] == pytest.approx(1 / 3)  # 50 / 150


def test_hd95_of_a_known_shift_equals_the_shift():
    g = np.zeros((48, 48), dtype=bool)
    g[10:40, 20] = True  # a vertical line: every surface pixel moves by exactly the shift
    for shift in (1, 3, 7):
        p = np.roll(g, shift, axis=1)
        assert hd95(p, g)[0] == pytest.approx(shift)
        assert hd95(g, p)[0] == pytest.approx(shift)
    # a translated square: its Hausdorff distance is the shift, HD95 cannot exceed it
    assert 0 < hd95(square(left=12), square(left=8))[0] <= 4.0


def test_hd95_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :50]
    preds, gts = [], []
    for _ in range(6):
        cy, cx, r = rng.integers(8, 30), rng.integers(8, 40), rng.integers(3, 9)
        gts.append((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
        cy2, cx2 = cy + rng.integers(-4, 5), cx + rng.integers(-4, 5)
        preds.append((np.abs(yy - cy2) < r) & (np.abs(xx - cx2) < r + 2))
    p, g = np.stack(preds), np.stack(gts)
    ours = hd95(p, g)
    ref = [brute_force_hd95(a, b) for a, b in zip(p, g)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_empty_rules():
    g = square()
    empty = np.zeros_like(g)
    small = np.zeros_like(g)
    small[0, 0:3] = True  # 3 predicted pixels
    p = np.stack([empty, empty, small, small])
    t = np.stack([g, empty, empty, g])
    dice, iou = dice_iou(p, t)
    hd = hd95(p, t)
    # empty prediction on a lesion image: 0, 0, diagonal
    assert dice[0] == 0.0 and iou[0] == 0.0 and hd[0] == pytest.approx(math.hypot(32, 32))
    # empty ground truth: excluded from Dice/IoU/HD95
    assert np.isnan(dice[1]) and np.isnan(iou[1]) and np.isnan(hd[1])
    assert np.isnan(dice[2]) and np.isnan(hd[2])
    assert dice[3] == 0.0
    fp = false_positive(p, t)
    assert fp[1] == 0.0 and fp[2] == 1.0 and np.isnan(fp[0]) and np.isnan(fp[3])
    assert false_positive(p, t, min_area=3)[2] == 0.0  # 3 pixels are not "above" min_area=3
    assert false_positive(p, t, min_area=2)[2] == 1.0


def test_inputs_torch_and_channel_dim_and_binarize():
    g = torch.from_numpy(square()).float()[None, None] * 255
    logits = torch.where(g > 0, 4.0, -4.0)
    pred = binarize(logits)
    assert pred.shape == (1, 32, 32) and pred.dtype == bool
    dice, _ = dice_iou(pred, g)
    assert dice[0] == 1.0
    assert binarize(torch.zeros(1, 1, 4, 4), threshold=0.4).all()  # sigmoid(0)=0.5 > 0.4
    with pytest.raises(ValueError):
        dice_iou(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))


def test_records_and_summary():
    g = square()
    empty = np.zeros_like(g)
    p = np.stack([g, square(left=13), empty, g, empty])
    t = np.stack([g, g, g, empty, empty])
    labels = ["benign", "benign", "malignant", "normal", "normal"]
    recs = segmentation_records(p, t, labels=labels, ids=list("abcde"))
    assert [r["id"] for r in recs] == list("abcde")
    assert recs[0]["dice"] == 1.0 and recs[3]["dice"] is None and recs[3]["false_positive"] == 1.0
    assert recs[4]["false_positive"] == 0.0 and recs[0]["false_positive"] is None
    s = summarize(recs)
    json.dumps(s)  # JSON-ready: no NaN objects
    assert s["overall"]["n"] == 5 and s["overall"]["n_lesion"] == 3
    d_b = [1.0, recs[1]["dice"]]
    assert s["per_label"]["benign"]["dice"]["mean"] == pytest.approx(np.mean(d_b))
    assert s["per_label"]["benign"]["dice"]["std"] == pytest.approx(np.std(d_b, ddof=1))
    assert s["overall"]["dice"]["median"] == pytest.approx(np.median([1.0, recs[1]["dice"], 0.0]))
    assert s["per_label"]["malignant"]["hd95"]["mean"] == pytest.approx(math.hypot(32, 32))
    assert s["per_label"]["normal"]["dice"]["mean"] is None
    assert s["per_label"]["normal"]["false_positive_rate"] == 0.5
    assert s["overall"]["false_positive_rate"] == 0.5
    assert s["per_label"]["benign"]["false_positive_rate"] is None


def test_confusion_and_balanced_accuracy():
    y = [0, 0, 0, 0, 1, 1]
    p = [0, 0, 0, 1, 1, 0]
    cm = confusion_matrix(y, p)
    np.testing.assert_array_equal(cm, [[3, 1], [1, 1]])
    assert balanced_accuracy(y, p) == pytest.approx((3 / 4 + 1 / 2) / 2)
    # class 2 never occurs in y_true: it is not averaged in, but its column counts
    cm3 = confusion_matrix([0, 1, 1], [2, 1, 1], num_classes=3)
    np.testing.assert_array_equal(cm3, [[0, 0, 1], [0, 2, 0], [0, 0, 0]])
    assert balanced_accuracy([0, 1, 1], [2, 1, 1], num_classes=3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], num_classes=2)
