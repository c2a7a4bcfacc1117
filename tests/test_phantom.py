"""The ultrasound phantom: BUSI layout, BUSI's file quirks, determinism and class-typical lesion statistics."""
import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.measure import label as cc_label, regionprops

from common.errors import UserError
from phantom.render import CLASSES, render_case, render_full
from phantom.simulator import (BUSI_ROOT, HEIGHT_RANGE, WIDTH_RANGE, _plan, _render_and_write, case_rng, class_counts,
                               generate_phantom)

N, SEED = 60, 3
NAME = re.compile(r"^(benign|malignant|normal) \((\d+)\)(_mask(?:_(\d+))?)?\.png$")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    summary = generate_phantom(out, N, seed=SEED, workers=2)
    return out, summary


def _root(out):
    return Path(out) / BUSI_ROOT


def _mask_bool(path):
    return np.array(Image.open(path).convert("L")) > 0


def _cases(out, label):
    """{number: (image path, [mask paths: _mask, _mask_1, ...])} of one class folder."""
    cases = {}
    for p in sorted((_root(out) / label).iterdir()):
        m = NAME.match(p.name)
        assert m and m.group(1) == label, f"unexpected file {p}"
        n = int(m.group(2))
        entry = cases.setdefault(n, [None, {}])
        if m.group(3) is None:
            entry[0] = p
        else:
            entry[1][int(m.group(4) or 0)] = p
    return {n: (img, [masks[k] for k in sorted(masks)]) for n, (img, masks) in cases.items()}


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- layout, counts
def test_class_counts_follow_ratio():
    assert class_counts(780) == {"benign": 437, "malignant": 210, "normal": 133}
    for n in (3, 4, 7, 10, 60, 101, 999):
        c = class_counts(n)
        assert sum(c.values()) == n and min(c.values()) >= 1
        exact = np.array([437, 210, 133]) * n / 780
        assert np.all(np.abs(np.array([c[k] for k in CLASSES]) - exact) < 1.0 + (n < 10))
    assert class_counts(9, (1, 1, 1)) == {"benign": 3, "malignant": 3, "normal": 3}
    assert class_counts(10, (1, 1, 0)) == {"benign": 5, "malignant": 5, "normal": 0}
    assert class_counts(3, (100, 1, 1)) == {"benign": 1, "malignant": 1, "normal": 1}


def test_layout_naming_and_numbering(phantom):
    out, summary = phantom
    assert sorted(p.name for p in _root(out).iterdir()) == sorted(CLASSES)
    assert not list(Path(out).glob("*.partial")), "the staging folder must be gone after a complete run"
    counts = class_counts(N)
    assert summary["counts"] == counts
    assert json.loads((Path(out) / "phantom.json").read_text())["counts"] == counts
    for label in CLASSES:
        cases = _cases(out, label)
        assert sorted(cases) == list(range(1, counts[label] + 1)), "BUSI numbering is 1..count per class"
        for n, (img, masks) in cases.items():
            assert img is not None and masks and masks[0].name == f"{label} ({n})_mask.png"
            assert [p.name for p in masks[1:]] == [f"{label} ({n})_mask_{k}.png" for k in range(1, len(masks))]


# ------------------------------------------------------------------------------------------- determinism
def test_byte_identical_whatever_the_workers(tmp_path):
    a = generate_phantom(tmp_path / "a", 10, seed=SEED, workers=2)
    b = generate_phantom(tmp_path / "b", 10, seed=SEED, workers=1)
    da = {p.relative_to(_root(tmp_path / "a")): _digest(p) for p in _root(tmp_path / "a").rglob("*.png")}
    db = {p.relative_to(_root(tmp_path / "b")): _digest(p) for p in _root(tmp_path / "b").rglob("*.png")}
    assert len(da) == 20 and da == db
    for key in ("counts", "extra_mask_files", "rgba_masks", "duplicates", "colour_images", "mean_lesion_fraction"):
        assert a[key] == b[key]


def test_quirk_cases_from_the_pool_match_in_process_rendering(phantom, tmp_path):
    """The fixture ran with 2 worker processes; its special cases re-rendered here, in process, are identical."""
    out, _ = phantom
    tasks, _ = _plan(SEED, class_counts(N), True)
    keys = [k for k, t in tasks.items() if t and (t["n_lesions"] > 1 or t["colour"])]
    keys += [(c, n) for c in CLASSES for n in (2, 3) if tasks[(c, n)]]
    assert len(keys) >= 5
    for c in CLASSES:
        (tmp_path / c).mkdir()
    for label, n in keys:
        _render_and_write((str(tmp_path), SEED, label, n, tasks[(label, n)], True))
    for p in tmp_path.rglob("*.png"):
        assert _digest(p) == _digest(_root(out) / p.relative_to(tmp_path)), p


def test_render_case_is_seeded():
    a = render_case(case_rng(5, "malignant", 2), "malignant", 330, 260)
    b = render_case(case_rng(5, "malignant", 2), "malignant", 330, 260)
    c = render_case(case_rng(5, "malignant", 3), "malignant", 330, 260)
    assert a[0].shape == a[1].shape == (330, 260) and a[0].dtype == np.uint8 and a[1].dtype == bool
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


# ------------------------------------------------------------------------------------------- file quirks
def test_images_rgb_grey_replicated_except_colour_cases(phantom):
    out, summary = phantom
    colour = set(summary["colour_images"])
    assert len(colour) >= 1
    for label in CLASSES:
        for n, (img, masks) in _cases(out, label).items():
            im = Image.open(img)
            assert im.mode == "RGB"
            a = np.asarray(im)
            grey = np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
            rel = f"{label}/{img.name}"
            assert grey == (rel not in colour), rel
            if rel in colour:   # real colour, not a slight tint
                assert (np.abs(a.astype(int) - a.mean(2, keepdims=True)).max(2) > 60).sum() > 20


def test_mask_modes_sizes_and_normal_masks(phantom):
    out, _ = phantom
    for label in CLASSES:
        for n, (img, masks) in _cases(out, label).items():
            w, h = Image.open(img).size
            assert HEIGHT_RANGE[0] <= h <= HEIGHT_RANGE[1] and WIDTH_RANGE[0] <= w <= WIDTH_RANGE[1]
            for p in masks:
                assert Image.open(p).size == (w, h), p
            first = Image.open(masks[0])
            if label == "normal":
                assert first.mode == "RGB" and len(masks) == 1
                assert not np.asarray(first).any(), "normal masks are empty"
            else:
                assert first.mode == "1", "tumour masks are 1-bit PNGs"
                # BUSI's trap: a 1-bit mask read by numpy is bool; '> 127' would silently give all-False
                assert np.asarray(first).dtype == bool and np.asarray(first).any()
                frac = _mask_bool(masks[0]).mean()
                assert 0.002 < frac < 0.3, (p, frac)


def test_extra_masks_cover_separate_lesions_one_rgba(phantom):
    out, summary = phantom
    assert summary["extra_masks"] >= 1 and len(summary["rgba_masks"]) >= 1
    found = []
    for label in ("benign", "malignant"):
        for n, (img, masks) in _cases(out, label).items():
            for p in masks[1:]:
                found.append(f"{label}/{p.name}")
                main, extra = _mask_bool(masks[0]), _mask_bool(p)
                assert extra.any() and not (main & extra).any(), "an extra mask covers a further lesion"
                assert Image.open(p).mode in ("1", "RGBA")
    assert sorted(found) == sorted(summary["extra_mask_files"])
    for rel in summary["rgba_masks"]:
        assert Image.open(_root(out) / rel).mode == "RGBA"
    # the full lesion is the OR of all masks: render_full keeps them apart, render_case returns the union
    case = render_full(case_rng(1, "benign", 7), "benign", 500, 560, n_lesions=3)
    assert len(case.masks) == 3
    assert sum(int(m.sum()) for m in case.masks) == int(case.mask.sum())


def test_mask_2_planned_for_large_datasets():
    tasks, duplicates = _plan(0, class_counts(400), True)
    lesions = [t["n_lesions"] for t in tasks.values() if t]
    assert lesions.count(3) == 1 and lesions.count(2) >= 5
    tasks, _ = _plan(0, class_counts(780), True)
    assert sum(t["n_lesions"] - 1 for t in tasks.values() if t) == 18       # as BUSI: 17 benign + 1 malignant
    assert duplicates[0][0] == "cross-label"


def test_duplicates_are_pixel_identical(phantom):
    out, summary = phantom
    kinds = [d["kind"] for d in summary["duplicates"]]
    assert kinds.count("cross-label") == 1 and kinds.count("same-label") >= 2
    for d in summary["duplicates"]:
        a, b = (_root(out) / f for f in d["files"])
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        ma, mb = (p.with_name(p.stem + "_mask.png") for p in (a, b))
        assert np.array_equal(_mask_bool(ma), _mask_bool(mb))
        la, lb = a.parent.name, b.parent.name
        assert (la != lb) == (d["kind"] == "cross-label")
        assert d["kind"] == "same-label" or a.name != b.name


def test_no_quirks_gives_plain_files(tmp_path):
    s = generate_phantom(tmp_path, 6, seed=1, workers=1, quirks=False)
    assert s["extra_masks"] == 0 and not s["duplicates"] and not s["colour_images"]
    for p in _root(tmp_path).rglob("*.png"):
        im = Image.open(p)
        assert im.mode == "L", p
        if p.stem.endswith("_mask"):
            assert set(np.unique(np.asarray(im))) <= {0, 255}
            assert np.asarray(im).any() == (p.parent.name != "normal")
        assert "_mask_" not in p.name


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    (_root(tmp_path) / "benign").mkdir(parents=True)
    (_root(tmp_path) / "benign" / "benign (1).png").write_bytes(b"real data")
    with pytest.raises(UserError, match="not a generated phantom"):
        generate_phantom(tmp_path, 6, workers=1)
    assert (_root(tmp_path) / "benign" / "benign (1).png").read_bytes() == b"real data"
    # a phantom is replaced by a new phantom
    generate_phantom(tmp_path / "p", 4, workers=1)
    s = generate_phantom(tmp_path / "p", 3, workers=1)
    assert s["counts"] == class_counts(3)
    assert sum(1 for p in _root(tmp_path / "p").rglob("*.png") if "_mask" not in p.name) == 3


# ------------------------------------------------------------------------------------------- realism
def _lesion_stats(img_path, mask_paths):
    g = np.array(Image.open(img_path).convert("L")).astype(float)
    full = np.zeros(g.shape, bool)
    for p in mask_paths:
        full |= _mask_bool(p)
    main = _mask_bool(mask_paths[0])
    lab = cc_label(main)
    region = max(regionprops(lab), key=lambda r: r.area)
    y0, x0, y1, x1 = region.bbox
    lh, lw = y1 - y0, x1 - x0
    win = (slice(max(0, y0 - 15), y1 + 15), slice(max(0, x0 - 15), x1 + 15))
    m8 = main[win].astype(np.uint8)
    ring = cv2.dilate(m8, np.ones((25, 25), np.uint8)).astype(bool)
    ring &= ~cv2.dilate(m8, np.ones((7, 7), np.uint8)).astype(bool) & ~full[win] & (g[win] > 0)
    rows = slice(y1 + 3, min(g.shape[0], y1 + 3 + max(8, lh // 2)))
    centre = slice(x0 + lw // 5, x1 - lw // 5)
    post = g[rows, centre][(~full[rows, centre]) & (g[rows, centre] > 0)]
    side = np.concatenate([g[rows, max(0, x0 - lw // 2):max(0, x0 - lw // 8)].ravel(),
                           g[rows, x1 + lw // 8:x1 + lw // 2].ravel()])
    side = side[side > 0]
    return {"solidity": region.solidity, "taller": lh > lw, "inside": g[main].mean(), "ring": g[win][ring].mean(),
            "posterior": (post.mean() / side.mean()) if post.size > 20 and side.size > 20 else np.nan}


def test_lesion_statistics_follow_radiology(phantom):
    out, summary = phantom
    stats = {label: [_lesion_stats(img, masks) for img, masks in _cases(out, label).values()]
             for label in ("benign", "malignant")}
    b, m = stats["benign"], stats["malignant"]
    mean = lambda rows, key: float(np.nanmean([r[key] for r in rows]))  # noqa: E731
    # shape: benign circumscribed and parallel, malignant irregular/spiculated and often non-parallel
    assert mean(b, "solidity") > 0.95 and mean(m, "solidity") < mean(b, "solidity") - 0.05
    assert mean(b, "taller") < 0.15 and mean(m, "taller") > mean(b, "taller") + 0.25
    # hypoechoic: every lesion darker than the tissue around it
    for rows in (b, m):
        assert np.mean([r["inside"] < 0.9 * r["ring"] for r in rows]) > 0.95
        assert mean(rows, "inside") < 0.6 * mean(rows, "ring")
    # posterior acoustic enhancement (benign) versus shadowing (malignant), on average
    assert mean(b, "posterior") > 1.05 and mean(m, "posterior") < 0.95
    # size: lesion area ~1-25 % of the image, mean in the region of BUSI's ~9 %
    fracs = [_mask_bool(masks[0]).mean() for label in ("benign", "malignant")
             for img, masks in _cases(out, label).values()]
    assert 0.03 < np.mean(fracs) < 0.16


def test_near_duplicates_are_resaved_copies(phantom):
    """BUSI's near-duplicates: a case saved again cropped, shifted, with other overlays, rescaled or re-encoded,
    a few of them under the other tumour label."""
    out, summary = phantom
    near = summary["near_duplicates"]
    kinds = [d["kind"] for d in near]
    assert kinds.count("same-label") >= 5 and kinds.count("cross-label") >= 2
    assert {d["variant"] for d in near} == {"crop", "shift", "overlay", "scale", "jpeg"}
    identical = {f for d in summary["duplicates"] for f in d["files"]}
    for d in near:
        src_rel, dst_rel = d["files"]
        assert not {src_rel, dst_rel} & identical
        assert (src_rel.split("/")[0] != dst_rel.split("/")[0]) == (d["kind"] == "cross-label")
        src, dst = (np.asarray(Image.open(_root(out) / f))[..., 0] for f in d["files"])
        sm, dm = (_mask_bool((_root(out) / f).with_name(Path(f).stem + "_mask.png")) for f in d["files"])
        assert src.shape != dst.shape or not np.array_equal(src, dst), d
        if d["variant"] == "crop":                       # an exact window of the original
            assert dst.shape[0] <= src.shape[0] and dst.shape[1] <= src.shape[1] and dst.shape != src.shape
            res = cv2.matchTemplate(src.astype(np.float32), dst.astype(np.float32), cv2.TM_SQDIFF)
            y, x = np.unravel_index(int(np.argmin(res)), res.shape)
            assert res.min() <= 1e-6 * float((dst.astype(np.float32) ** 2).sum())    # 0 up to float rounding
            assert np.array_equal(sm[y:y + dst.shape[0], x:x + dst.shape[1]], dm)
        elif d["variant"] == "shift":                    # same size, the content moved and the rest black
            h, w = dst.shape
            assert dst.shape == src.shape and (not sm.any() or sm.sum() >= dm.sum() > 0.5 * sm.sum())
            win = dst[h // 4:3 * h // 4, w // 4:3 * w // 4].astype(np.float32)
            res = cv2.matchTemplate(src.astype(np.float32), win, cv2.TM_SQDIFF)
            y, x = np.unravel_index(int(np.argmin(res)), res.shape)
            assert res.min() <= 1e-6 * float((win ** 2).sum()) and (y, x) != (h // 4, w // 4)
        elif d["variant"] == "scale":                    # rescaled, lesion area with it
            f = dst.shape[1] / src.shape[1]
            assert abs(f - 1) > 0.08 and abs(dst.shape[0] / src.shape[0] - f) < 0.05
            assert not sm.any() or abs(dm.sum() / sm.sum() - f * f) < 0.1 * f * f
        elif d["variant"] == "jpeg":                     # re-encoded: close, not equal; same mask
            assert dst.shape == src.shape and 0 < np.abs(dst.astype(int) - src).mean() < 4
            assert np.array_equal(sm, dm)
        else:                                            # other burned-in overlays on the same scan
            assert dst.shape == src.shape and np.array_equal(sm, dm)
            assert 0 < (dst != src).mean() < 0.05
