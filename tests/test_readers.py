"""Raw-dataset readers: layout detection, every storage quirk of BUSI / BUS-BRA / UDIAT, decoding rules."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError
from common.io import pixel_hash
from data.decode import (SPECK_MAX_PIXELS, decode_cases, load_case, pad_to_square, remove_specks, resize_pair,
                         to_binary, to_gray)
from data.readers import detect_format, scan_dataset
from fixtures.make_raw import ellipse, texture, write_busi, write_udiat, write_udiat_sheet

FIXTURES = Path(__file__).parent / "fixtures"
BUSBRA = FIXTURES / "busbra"


@pytest.fixture(scope="module")
def busi(tmp_path_factory):
    return write_busi(tmp_path_factory.mktemp("busi"))


@pytest.fixture(scope="module")
def busi_scan(busi):
    return scan_dataset(busi)


def _case(scan, case_id):
    return next(c for c in scan.cases if c.case_id == case_id)


# ---------------------------------------------------------------------------------------------- detection
def test_detect_dataset_folder_or_parent(busi, tmp_path):
    assert detect_format(busi) == ("busi", busi)
    assert detect_format(busi.parent) == ("busi", busi)
    assert detect_format(BUSBRA) == ("busbra", BUSBRA)
    bus = write_udiat(tmp_path)
    assert detect_format(tmp_path) == ("udiat", bus)
    assert detect_format(bus, "udiat") == ("udiat", bus)


def test_detect_errors_name_what_was_looked_for(tmp_path):
    with pytest.raises(UserError, match="not found"):
        detect_format(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")       # clutter only: still empty
    with pytest.raises(UserError, match="empty"):
        detect_format(tmp_path / "empty")
    other = tmp_path / "other"
    (other / "pictures").mkdir(parents=True)
    (other / "notes.txt").write_text("hi")
    with pytest.raises(UserError) as err:
        detect_format(other)
    msg = str(err.value)
    assert "no known dataset layout" in msg and "benign/" in msg and "bus_data.csv" in msg and "DatasetB.xlsx" in msg
    with pytest.raises(UserError, match="bus_data.csv") as err:
        detect_format(other, "busbra")
    assert "benign/" not in str(err.value)


def test_detect_ambiguous_parent(tmp_path):
    write_busi(tmp_path)
    shutil.copytree(BUSBRA, tmp_path / "BUSBRA")
    with pytest.raises(UserError, match="several datasets"):
        detect_format(tmp_path)
    assert detect_format(tmp_path, "busbra") == ("busbra", tmp_path / "BUSBRA")


# --------------------------------------------------------------------------------------------------- BUSI
def test_busi_scan(busi_scan, busi):
    s = busi_scan
    assert (s.format, s.dataset, s.root) == ("busi", "BUSI", busi)
    labels = [c.label for c in s.cases]
    assert (labels.count("benign"), labels.count("malignant"), labels.count("normal")) == (5, 3, 2)
    assert s.problems == [] and s.unexpected == []            # .DS_Store / Thumbs.db ignored, not reported
    b1 = _case(s, "busi_benign_0001")
    assert [p.name for p in b1.masks] == ["benign (1)_mask.png", "benign (1)_mask_1.png", "benign (1)_mask_2.png"]
    assert b1.group is None and b1.fold is None
    assert b1.provenance["original_image"] == "benign/benign (1).png" and b1.provenance["n_masks"] == 3
    assert len(_case(s, "busi_malignant_0001").masks) == 2
    assert [c.case_id for c in s.cases][:5] == [f"busi_benign_{i:04d}" for i in range(1, 6)]


def test_busi_storage_quirks(busi):
    b = busi / "benign"
    with Image.open(b / "benign (3).png") as im:
        assert im.mode == "RGB"
        gray = to_gray(im)
    assert gray.ndim == 2 and gray.dtype == np.uint8
    assert np.array_equal(gray, np.asarray(Image.open(b / "benign (3).png"))[..., 0])   # RGB-stored gray: exact
    with Image.open(b / "benign (2).png") as im:                                      # real colour
        assert to_gray(im).shape == im.size[::-1]
        assert to_gray(im)[10, 10] == np.asarray(im.convert("L"))[10, 10]
    with Image.open(b / "benign (3)_mask.png") as im:
        assert im.mode == "1"
        assert not (np.asarray(im) > 127).any()               # the trap: bool array, '> 127' finds nothing
        assert to_binary(im).sum() > 20
    with Image.open(busi / "normal" / "normal (1)_mask.png") as im:
        assert im.mode == "RGB" and not to_binary(im).any()
    with Image.open(b / "benign (1)_mask_1.png") as im:
        assert im.mode == "RGBA" and 0 < to_binary(im).sum() < im.size[0] * im.size[1] / 4


def test_rgba_transparent_background_is_background():
    rgba = np.full((20, 20, 4), 255, np.uint8)
    rgba[..., 3] = 0
    rgba[5:9, 5:9, 3] = 255
    assert to_binary(Image.fromarray(rgba, "RGBA")).sum() == 16


def test_busi_masks_merged_with_or(busi_scan, busi):
    case = _case(busi_scan, "busi_benign_0001")
    dec = load_case(case, 64)
    assert dec.problems == []
    parts = [to_binary(Image.open(p)) for p in case.masks]
    merged = parts[0] | parts[1] | parts[2]
    assert merged.sum() > max(p.sum() for p in parts)
    gray = to_gray(Image.open(case.image))
    img, mask = resize_pair(gray, merged, 64)
    assert np.array_equal(dec.image, img) and np.array_equal(dec.mask, mask)
    assert (dec.width, dec.height) == Image.open(case.image).size
    assert dec.mask.dtype == bool and dec.image.shape == (64, 64)


def test_busi_duplicates_share_pixel_hash(busi_scan):
    dec = {c.case_id: load_case(c, 32) for c in busi_scan.cases}
    assert all(d.problems == [] for d in dec.values())
    assert dec["busi_malignant_0003"].pixel_hash == dec["busi_benign_0004"].pixel_hash
    assert dec["busi_benign_0005"].pixel_hash == dec["busi_benign_0003"].pixel_hash
    assert len({d.pixel_hash for d in dec.values()}) == len(dec) - 2
    assert not dec["busi_normal_0001"].mask.any() and dec["busi_malignant_0002"].mask.any()


def test_busi_unexpected_files_are_reported(tmp_path):
    ds = write_busi(tmp_path)
    (ds / "README.txt").write_text("hello")
    (ds / "benign" / "benign (1).jpg").write_bytes(b"x")
    s = scan_dataset(tmp_path)
    assert sorted(Path(u).name for u in s.unexpected) == ["README.txt", "benign (1).jpg"]


def test_phantom_output_has_busi_quirks(tmp_path):
    from phantom.simulator import generate_phantom

    generate_phantom(tmp_path / "raw", 50, seed=3, workers=2)
    s = scan_dataset(tmp_path / "raw")
    assert s.format == "busi" and s.problems == [] and s.root.name == "Dataset_BUSI_with_GT"
    assert {c.label for c in s.cases} == {"benign", "malignant", "normal"} and len(s.cases) == 50
    modes = {(c.label, Image.open(c.image).mode, Image.open(c.masks[0]).mode) for c in s.cases}
    assert {m[1] for m in modes} == {"RGB"}                                     # RGB-stored images
    assert {m[2] for m in modes if m[0] != "normal"} == {"1"}                   # 1-bit lesion masks
    assert {m[2] for m in modes if m[0] == "normal"} == {"RGB"}                 # 8-bit RGB empty normal masks
    extra = [c for c in s.cases if len(c.masks) > 1]
    assert extra and any(Image.open(p).mode == "RGBA" for c in extra for p in c.masks[1:])
    decoded = decode_cases(s.cases, 32, workers=2)
    assert all(d.problems == [] for d in decoded)
    for c, d in zip(s.cases, decoded):
        assert d.mask.any() == (c.label != "normal") and d.image.shape == (32, 32)
    colour = [c for c in s.cases if (lambda a: (a[..., 0] != a[..., 1]).any())(np.asarray(Image.open(c.image)))]
    assert colour                                                               # some real colour images
    by_hash = {}
    for c, d in zip(s.cases, decoded):
        by_hash.setdefault(d.pixel_hash, []).append(c.label)
    copies = [labels for labels in by_hash.values() if len(labels) > 1]
    assert any(len(set(x)) > 1 for x in copies) and any(len(set(x)) == 1 for x in copies)


# ------------------------------------------------------------------------------------------------ BUS-BRA
def test_busbra_fixture_scan():
    s = scan_dataset(BUSBRA)
    assert (s.format, s.dataset) == ("busbra", "BUS-BRA") and s.problems == [] and s.unexpected == []
    assert len(s.cases) == 12 and s.has_folds and s.folds_file == "5-fold-cv.csv"
    labels = [c.label for c in s.cases]
    assert labels.count("benign") == 7 and labels.count("malignant") == 5
    c = _case(s, "busbra_0101-l")
    assert c.group == "busbra_case_101" == _case(s, "busbra_0101-r").group
    assert c.fold == 2 and c.masks == [BUSBRA / "Masks" / "mask_0101-l.png"]
    assert c.provenance["patient"] == "101" and c.provenance["device"].startswith("GE Logiq")
    assert c.provenance["birads"] == "3" and c.provenance["official_fold"] == 2
    assert len({x.group for x in s.cases}) == 7


def test_busbra_specks_and_pixel_sizes():
    s = scan_dataset(BUSBRA)
    dec = {d.case_id: d for d in decode_cases(s.cases, 48, workers=1)}
    assert all(d.problems == [] for d in dec.values())
    assert {k for k, d in dec.items() if d.specks_removed} == {"busbra_0101-l", "busbra_1046-l"}
    assert dec["busbra_0101-l"].specks_removed == 1
    d = dec["busbra_0912-l"]                                  # bus_data.csv says 360x354
    assert (d.width, d.height) == (360, 352) and d.size_differs
    assert sum(x.size_differs for x in dec.values()) == 1
    assert all(x.mask.any() for x in dec.values())


def test_busbra_bad_rows(tmp_path):
    root = tmp_path / "BUSBRA"
    shutil.copytree(BUSBRA, root)
    text = (root / "bus_data.csv").read_text().replace("bus_0165-l,165,mucinous carcinoma,malignant",
                                                       "bus_0165-l,165,mucinous carcinoma,suspicious")
    (root / "bus_data.csv").write_text(text)
    (root / "Masks" / "mask_0191-r.png").unlink()
    shutil.copy(root / "Images" / "bus_1001-l.png", root / "Images" / "bus_9999-l.png")
    shutil.copy(root / "Masks" / "mask_1001-l.png", root / "Masks" / "mask_9998-l.png")
    s = scan_dataset(root)
    got = {(Path(p.path).name, p.rule.split(" (")[0].split(": ")[-1]) for p in s.problems}
    assert ("bus_data.csv", "unknown label 'suspicious' for bus_0165-l") in got
    assert ("bus_0191-r.png", "image without mask") in got
    assert ("bus_9999-l.png", "image not listed in bus_data.csv") in got
    assert any(n == "mask_9998-l.png" and r == "mask without image" for n, r in got)
    assert len(s.cases) == 10


# -------------------------------------------------------------------------------------------------- UDIAT
def test_udiat_layout(tmp_path):
    bus = write_udiat(tmp_path)
    s = scan_dataset(tmp_path)
    assert (s.format, s.dataset, s.root) == ("udiat", "UDIAT", bus)
    assert s.problems == [] and s.unexpected == []            # GT/.DS_Store ignored; junk columns ignored
    assert [c.case_id for c in s.cases] == ["udiat_000001", "udiat_000002", "udiat_000003", "udiat_000004",
                                            "udiat_000147", "udiat_000295", "udiat_000310"]
    assert [c.label for c in s.cases][:2] == ["benign", "malignant"] and s.cases[0].provenance["diagnosis"] == "FA"
    modes = {Image.open(c.masks[0]).mode for c in s.cases}
    assert modes == {"1", "L"}                                # mixed 1-bit and 8-bit 0/255
    dec = {d.case_id: d for d in decode_cases(s.cases, 40, workers=1)}
    assert all(d.problems == [] and d.mask.any() for d in dec.values())
    assert dec["udiat_000310"].pixel_hash == dec["udiat_000003"].pixel_hash
    import cv2
    n, _ = cv2.connectedComponents(dec["udiat_000004"].mask.astype(np.uint8), connectivity=4)
    assert n - 1 == 2                                          # both regions of a multi-region mask survive


def test_udiat_sheet_problems(tmp_path):
    bus = write_udiat(tmp_path)
    write_udiat_sheet(bus / "DatasetB.xlsx", [(1, "Benign"), ("2.0", "Malignant"), (3, "Unknown"),
                                              (4, "Malignant"), (147, "benign"), (295, "Malignant")])
    (bus / "GT" / "000295.png").unlink()
    s = scan_dataset(tmp_path)
    rules = {(Path(p.path).name, p.rule) for p in s.problems}
    assert any(n == "DatasetB.xlsx" and "unknown label 'Unknown' for image 000003" in r for n, r in rules)
    assert ("000310.png", "image not listed in DatasetB.xlsx (label unknown)") in rules
    assert any(n == "000295.png" and r.startswith("image without mask") for n, r in rules)
    assert [c.case_id for c in s.cases] == ["udiat_000001", "udiat_000002", "udiat_000004", "udiat_000147"]


# ------------------------------------------------------------------------------------------------ decoding
def _pair(tmp_path, name, gray, mask, label="benign", mask_mode="1"):
    from data.readers import RawCase
    img_p, mask_p = tmp_path / f"{name}.png", tmp_path / f"{name}_mask.png"
    Image.fromarray(gray).save(img_p)
    Image.fromarray(mask.astype(np.uint8) * 255).convert(mask_mode).save(mask_p)
    return RawCase(name, label, img_p, [mask_p])


def test_decode_problems(tmp_path):
    g = texture(60, 50, 1)
    m = ellipse(60, 50, 30, 25, 10, 8)
    ok = _pair(tmp_path, "ok", g, m)
    assert load_case(ok, 32).problems == []
    trunc = _pair(tmp_path, "trunc", g, m)
    data = trunc.image.read_bytes()
    trunc.image.write_bytes(data[: len(data) // 2])
    p = load_case(trunc, 32).problems
    assert len(p) == 1 and p[0].path == str(trunc.image) and "corrupt or truncated" in p[0].rule
    garbage = _pair(tmp_path, "garbage", g, m)
    garbage.masks[0].write_bytes(b"not a png at all")
    assert "corrupt or truncated mask" in load_case(garbage, 32).problems[0].rule
    size = _pair(tmp_path, "size", g, ellipse(61, 50, 30, 25, 10, 8))
    p = load_case(size, 32).problems
    assert p[0].path == str(size.masks[0]) and "size mismatch" in p[0].rule and "61x50" in p[0].rule
    empty = _pair(tmp_path, "empty", g, np.zeros_like(m), label="malignant")
    assert "empty mask in the malignant class" in load_case(empty, 32).problems[0].rule
    normal = _pair(tmp_path, "normal", g, m, label="normal")
    assert "non-empty mask on a normal image" in load_case(normal, 32).problems[0].rule
    ok_normal = _pair(tmp_path, "nn", g, np.zeros_like(m), label="normal", mask_mode="RGB")
    assert load_case(ok_normal, 32).problems == []


def test_decode_pixel_hash_and_gray(tmp_path):
    g = texture(60, 50, 2)
    case = _pair(tmp_path, "a", np.stack([g] * 3, -1), ellipse(60, 50, 30, 25, 10, 8))
    d = load_case(case, 16)
    assert d.pixel_hash == pixel_hash(g) and d.image.shape == (16, 16) and d.image.dtype == np.uint8


def test_remove_specks_rule():
    m = np.zeros((40, 40), bool)
    m[10:20, 10:20] = True
    m[20, 20] = True                       # touches the lesion only diagonally: a separate 4-connected speck
    m[30, 5:7] = True                      # a 2 px speck
    out, n = remove_specks(m)
    assert n == 2 and out.sum() == 100
    lone = np.zeros((40, 40), bool)
    lone[3, 3] = True                      # the only region is never removed, however small
    out, n = remove_specks(lone)
    assert n == 0 and out.sum() == 1
    big = np.zeros((40, 40), bool)
    big[5:10, 5:10] = big[20:30, 20:30] = True
    assert remove_specks(big)[1] == 0 and SPECK_MAX_PIXELS < 25


def test_resize_never_loses_a_lesion():
    img = np.full((900, 700), 100, np.uint8)
    m = np.zeros((900, 700), bool)
    m[400:403, 300:302] = True             # 6 px lesion: far below one output pixel at 16 px
    m[100:104, 600:603] = True             # a second tiny region elsewhere
    m[700, :] = True                       # a thin line: coverage < 0.5 everywhere
    i, out = resize_pair(img, m, 16)
    assert i.shape == out.shape == (16, 16) and out.dtype == bool
    import cv2
    n, _ = cv2.connectedComponents(out.astype(np.uint8), connectivity=8)
    assert n - 1 == 3
    empty = resize_pair(img, np.zeros_like(m), 16)[1]
    assert not empty.any()


def test_resize_area_threshold_and_pad():
    m = np.zeros((100, 200), bool)
    m[30:70, 50:150] = True                # 40% of the height, half the width
    img = np.full((100, 200), 50, np.uint8)
    _, s = resize_pair(img, m, 20)
    assert s.sum() == 80                    # stretch: 8 x 10 of 20 x 20
    pi, p = resize_pair(img, m, 20, "pad")
    ys, xs = np.nonzero(p)
    assert p.sum() == 40 and np.ptp(ys) + 1 == 4 and np.ptp(xs) + 1 == 10   # aspect ratio kept
    assert pi[0].max() == 0 and pi[10, 10] == 50                        # zero padding top and bottom
    assert pad_to_square(np.ones((2, 4), np.uint8)).tolist() == [[0] * 4, [1] * 4, [1] * 4, [0] * 4]
    with pytest.raises(ValueError):
        resize_pair(img, m, 20, "crop")


def test_parallel_decode_matches_serial(busi_scan):
    one = decode_cases(busi_scan.cases, 24, workers=1)
    two = decode_cases(busi_scan.cases, 24, workers=2)
    assert [d.case_id for d in one] == [c.case_id for c in busi_scan.cases] == [d.case_id for d in two]
    for a, b in zip(one, two):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.pixel_hash == b.pixel_hash
