"""The "Turing test" reader study: the page and its sealed key, scoring, bad inputs, and a scripted reader in a
real headless Chromium (skipped when playwright or /usr/bin/chromium is missing)."""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import stats

import evaluate
from common.errors import UserError
from data.pairs import PairDatasetWriter
from metrics import reader_study as RS

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
CHROMIUM = Path("/usr/bin/chromium")
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def _write(path: Path, n: int, prefix: str, source: str, labels, splits, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with PairDatasetWriter(path, SIZE) as w:
        for i in range(n):
            w.add(f"{prefix}{i:03d}", rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8),
                  np.zeros((SIZE, SIZE), bool), label=labels[i % len(labels)], split=splits[i % len(splits)],
                  source=source)
        w.commit("tests")
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader_study")
    return {"real": _write(root / "real", 36, "realcase", "real", ["benign", "malignant", "normal"],
                           ["train", "val", "test", "train"], 1),
            "syn": _write(root / "syn", 16, "gencase", "synthetic", ["benign", "malignant"], ["train"], 2),
            "root": root}


def _build(sets, out, n=10, seed=0):
    return RS.build_reader_study(sets["real"], sets["syn"], n, out, seed=seed)


def _answers(path: Path, key: dict, rule, reader="", session="s1", conf=lambda item, src: 2, header=True):
    """answers.csv for ``key``: ``rule(item, true_source) -> answer`` for every item."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(RS.CSV_COLUMNS)
    for item, v in key["items"].items():
        w.writerow([key["study"], session, reader, item, rule(item, v["source"]), conf(item, v["source"]), 1.5])
    with open(path, "a") as fh:
        fh.write(buf.getvalue())
    return path


# ============================================================================ the page and the key
def test_page_and_key(sets, tmp_path):
    key = _build(sets, tmp_path)
    page = (tmp_path / RS.PAGE_NAME).read_text()
    on_disk = json.loads((tmp_path / RS.KEY_NAME).read_text())
    assert on_disk["items"] == key["items"] and on_disk["page_sha256"] == key["page_sha256"]
    assert hashlib.sha256((tmp_path / RS.PAGE_NAME).read_bytes()).hexdigest() == key["page_sha256"]
    assert key["n"] == 10 and list(key["items"]) == [f"item_{i:03d}" for i in range(1, 11)]
    sources = [v["source"] for v in key["items"].values()]
    assert sources.count("real") == sources.count("synthetic") == 5
    # class-balanced, same class mix on both sides, no class the generator does not make
    assert key["per_class"] == {"real": {"benign": 3, "malignant": 2}, "synthetic": {"benign": 3, "malignant": 2}}
    real_meta = {r["id"]: r for r in csv.DictReader(open(sets["real"] / "metadata.csv"))}
    for v in key["items"].values():
        if v["source"] == "real":
            assert real_meta[v["id"]]["split"] in ("val", "test")  # never a training image
    # N embedded images, in key order, pixel-identical to the dataset images
    uris = DATA_URI.findall(page)
    assert len(uris) == 10
    for b64, v in zip(uris, key["items"].values()):
        shown = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(shown, cv2.imread(v["image"], cv2.IMREAD_UNCHANGED))
    # nothing of the key in the page
    text = DATA_URI.sub("", page)
    for v in key["items"].values():
        assert v["id"] not in text
    for leak in ("realcase", "gencase", str(sets["root"]), "benign", "malignant", "normal", "source", ".png", "train"):
        assert leak not in text
    assert "http://" not in text and "https://" not in text and "<link" not in text and " src=\"" not in text
    assert "Download answers (CSV)" in page and "localStorage" in page and "image-rendering:pixelated" in page


def test_page_template_is_the_same_whatever_the_items(sets, tmp_path):
    """Apart from the images and the study code, two studies' pages are identical: nothing else varies per item."""
    k0, k1 = _build(sets, tmp_path / "a", seed=0), _build(sets, tmp_path / "b", seed=1)
    assert [v["id"] for v in k0["items"].values()] != [v["id"] for v in k1["items"].values()]
    p0, p1 = ((tmp_path / d / RS.PAGE_NAME).read_text() for d in "ab")
    strip = [DATA_URI.sub("IMG", p).replace(k["study"], "STUDY") for p, k in ((p0, k0), (p1, k1))]
    assert strip[0] == strip[1]
    # the same seed gives the same page, byte for byte, and the same key
    k0b = _build(sets, tmp_path / "c", seed=0)
    assert (tmp_path / "c" / RS.PAGE_NAME).read_bytes() == (tmp_path / "a" / RS.PAGE_NAME).read_bytes()
    assert k0b["items"] == k0["items"] and k0b["page_sha256"] == k0["page_sha256"]
    # rebuilding the same study in place is fine; another study over its key is refused
    _build(sets, tmp_path / "a", seed=0)
    with pytest.raises(UserError, match=r"reader_study_key\.json: already holds the key of a different study"):
        _build(sets, tmp_path / "a", seed=5)


def test_odd_n_and_dataset_without_synthetic_rows(sets, tmp_path):
    second = _write(tmp_path / "draw2", 8, "other", "real", ["benign", "malignant"], ["train"], 3)
    key = RS.build_reader_study(sets["real"], second, 7, tmp_path / "o", seed=3)
    sources = [v["source"] for v in key["items"].values()]
    assert len(sources) == 7 and abs(sources.count("real") - sources.count("synthetic")) == 1
    assert {v["id"] for v in key["items"].values() if v["source"] == "synthetic"} <= {f"other{i:03d}" for i in range(8)}


def test_build_bad_inputs(sets, tmp_path):
    few = _write(tmp_path / "few", 3, "f", "synthetic", ["benign"], ["train"], 4)
    with pytest.raises(UserError, match=r"few: 3 synthetic images, a 8-image study needs 4"):
        RS.build_reader_study(sets["real"], few, 8, tmp_path / "o")
    with pytest.raises(UserError, match=r"real: 12 real val\+test images of class\(es\) benign, malignant .*needs 13"):
        _build(sets, tmp_path, n=26)
    with pytest.raises(UserError, match="at least 2 images"):
        _build(sets, tmp_path, n=1)
    rng = np.random.default_rng(0)
    with PairDatasetWriter(tmp_path / "big", 2 * SIZE) as w:
        w.add("b0", rng.integers(0, 255, (2 * SIZE, 2 * SIZE), dtype=np.uint8), np.zeros((2 * SIZE,) * 2, bool),
              label="benign", split="train", source="synthetic")
        w.commit("tests")
    with pytest.raises(UserError, match="image sizes differ"):
        RS.build_reader_study(sets["real"], tmp_path / "big", 2, tmp_path / "o")
    with pytest.raises(UserError, match="needs --real_data and --synthetic_data"):
        evaluate.main(["--reader_study", "4", "--output_dir", str(tmp_path / "o")])


# ============================================================================ scoring
@pytest.fixture(scope="module")
def study(sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, _build(sets, out)


def test_perfect_and_always_real_readers(study, tmp_path):
    out, key = study
    perfect = RS.score_reader_study(_answers(tmp_path / "p.csv", key, lambda i, s: s), out / RS.KEY_NAME)
    assert perfect["n_answered"] == 10 and perfect["accuracy"] == 1.0 and perfect["auc"] == 1.0
    assert perfect["sensitivity"] == perfect["specificity"] == 1.0
    assert perfect["binomial_p"] == pytest.approx(2 * 0.5 ** 10) and perfect["binomial_p"] < 0.01
    assert perfect["per_class"]["benign"]["accuracy"] == 1.0 and perfect["warnings"] == []
    lazy = RS.score_reader_study(_answers(tmp_path / "r.csv", key, lambda i, s: "real"), out / RS.KEY_NAME)
    assert lazy["accuracy"] == 0.5 and lazy["sensitivity"] == 0.0 and lazy["specificity"] == 1.0
    assert lazy["auc"] == 0.5 and lazy["binomial_p"] == pytest.approx(1.0)
    # a reader who is always wrong but sure of it is as informative as a perfect one, with the AUC flipped
    wrong = RS.score_reader_study(_answers(tmp_path / "w.csv", key, lambda i, s: "real" if s == "synthetic"
                                           else "synthetic"), out / RS.KEY_NAME)
    assert wrong["accuracy"] == 0.0 and wrong["auc"] == 0.0 and wrong["binomial_p"] < 0.01


def _hand_key(path: Path, sources: dict[str, str]) -> Path:
    items = {k: {"source": s, "id": k.upper(), "label": "benign", "dataset": "x", "image": "x"}
             for k, s in sources.items()}
    path.write_text(json.dumps({"format": RS.KEY_FORMAT, "study": "abc", "page_sha256": "0" * 64, "items": items}))
    return path


def test_auc_on_a_hand_computed_case(tmp_path):
    # synthetic items scored +3 and -1, real items -2 and -1: pairs (3>-2) (3>-1) (-1>-2) (-1=-1) -> 3.5 / 4
    key = _hand_key(tmp_path / "key.json", {"a": "synthetic", "b": "synthetic", "c": "real", "d": "real"})
    (tmp_path / "ans.csv").write_text("reader,item,answer,confidence,seconds\n"
                                      "x,a,synthetic,3,1\nx,b,real,1,1\nx,c,real,2,1\nx,d,real,1,1\n")
    res = RS.score_reader_study(tmp_path / "ans.csv", key)
    assert res["auc"] == pytest.approx(0.875)
    assert res["accuracy"] == 0.75 and res["sensitivity"] == 0.5 and res["specificity"] == 1.0
    assert res["binomial_p"] == pytest.approx(stats.binomtest(3, 4, 0.5).pvalue) == pytest.approx(0.625)


def test_several_readers_concatenated(study, tmp_path):
    out, key = study
    csv_path = tmp_path / "all.csv"
    _answers(csv_path, key, lambda i, s: s, reader="Ann", session="a1")
    _answers(csv_path, key, lambda i, s: "real", reader="Bob", session="b1")         # header repeated
    _answers(csv_path, key, lambda i, s: s, reader="", session="c1")
    _answers(csv_path, key, lambda i, s: "synthetic", reader="", session="d1", header=False)
    res = RS.score_reader_study(csv_path, out / RS.KEY_NAME)
    assert res["n_readers"] == 4 and res["n_answered"] == 40 and res["accuracy"] == pytest.approx(0.75)
    per = res["per_reader"]
    assert set(per) == {"Ann", "Bob", "anonymous [c1]", "anonymous [d1]"}
    assert per["Ann"]["accuracy"] == 1.0 and per["Bob"]["sensitivity"] == 0.0 and per["Bob"]["n_answered"] == 10
    assert per["anonymous [d1]"]["specificity"] == 0.0 and per["Ann"]["median_seconds"] == 1.5
    assert any("independent" in w for w in res["warnings"])
    assert "Bob" in RS.format_score(res)


def _bad_cases(key):
    head = ",".join(RS.CSV_COLUMNS) + "\n"
    good = f"{key['study']},s,Ann,item_001,real,2,1\n"
    return {
        "unknown item": (head + good + f"{key['study']},s,Ann,item_999,real,2,1\n", r"line 3: unknown item 'item_999'"),
        "bad answer": (head + f"{key['study']},s,Ann,item_001,fake,2,1\n", r"line 2: answer must be real or synthetic"),
        "bad confidence": (head + f"{key['study']},s,Ann,item_001,real,high,1\n", r"line 2: confidence must be 1, 2 or 3"),
        "missing column": ("reader,item,answer\nAnn,item_001,real\n", r"missing column\(s\) confidence"),
        "empty": ("", r"empty file"),
        "header only": (head, r"no answers \(only a header\)"),
        "twice": (head + good + good, r"line 3: Ann answered item_001 twice \(first on line 2"),
        "other study": (head + "ffffffffffff,s,Ann,item_001,real,2,1\n", r"line 2: answers are for study ffffffffffff "
                        r"but .*reader_study_key\.json is the key of study"),
    }


@pytest.mark.parametrize("case", ["unknown item", "bad answer", "bad confidence", "missing column", "empty",
                                  "header only", "twice", "other study"])
def test_bad_answers(study, tmp_path, case):
    out, key = study
    text, message = _bad_cases(key)[case]
    (tmp_path / "answers.csv").write_text(text)
    with pytest.raises(UserError, match=r"answers\.csv: " + message):
        RS.score_reader_study(tmp_path / "answers.csv", out / RS.KEY_NAME)


def test_bad_key_and_page(study, tmp_path):
    out, key = study
    answers = _answers(tmp_path / "answers.csv", key, lambda i, s: s)
    assert RS.score_reader_study(answers, out / RS.KEY_NAME, out / RS.PAGE_NAME)["accuracy"] == 1.0
    edited = tmp_path / "edited.html"
    edited.write_text((out / RS.PAGE_NAME).read_text().replace("Real or synthetic?", "Which?"))
    with pytest.raises(UserError, match=r"reader_study_key\.json: page sha256 \w+\.\.\. does not match .*edited\.html"):
        RS.score_reader_study(answers, out / RS.KEY_NAME, edited)
    (tmp_path / "k.json").write_text("{not json")
    with pytest.raises(UserError, match=r"k\.json: not valid JSON"):
        RS.score_reader_study(answers, tmp_path / "k.json")
    (tmp_path / "k.json").write_text(json.dumps({"items": {}}))
    with pytest.raises(UserError, match=r"k\.json: not a reader-study key"):
        RS.score_reader_study(answers, tmp_path / "k.json")
    with pytest.raises(UserError, match=r"nope\.csv: answers file not found"):
        RS.score_reader_study(tmp_path / "nope.csv", out / RS.KEY_NAME)


def test_evaluate_cli(sets, tmp_path):
    out = tmp_path / "study"
    assert evaluate.main(["--reader_study", "6", "--real_data", str(sets["real"]), "--synthetic_data",
                          str(sets["syn"]), "--output_dir", str(out), "--seed", "4"]) == 0
    key = json.loads((out / RS.KEY_NAME).read_text())
    assert "--reader_study 6 --real_data" in key["parameters"]["command"] and key["seed"] == 4
    answers = _answers(tmp_path / "answers.csv", key, lambda i, s: s)
    assert evaluate.main(["--score_reader_study", str(answers), "--key", str(out / RS.KEY_NAME), "--output_dir",
                          str(tmp_path / "score")]) == 0
    score = json.loads((tmp_path / "score" / "reader_study_score.json").read_text())
    assert score["n_answered"] == 6 and score["accuracy"] == 1.0 and score["key"] == str(out / RS.KEY_NAME)
    with pytest.raises(UserError, match="needs --key"):
        evaluate.main(["--score_reader_study", str(answers)])
    (tmp_path / "bad.csv").write_text("item,answer,confidence\nitem_001,maybe,2\n")
    res = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--score_reader_study", str(tmp_path / "bad.csv"),
                          "--key", str(out / RS.KEY_NAME), "--output_dir", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "bad.csv: line 2: answer must be real or synthetic" in res.stderr


# ============================================================================ a scripted reader in Chromium
def test_browser_reader(sets, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                   "(pip install -r requirements-browser.txt)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium)")
    key = _build(sets, tmp_path / "study", n=6, seed=2)
    truth = {k: v["source"] for k, v in key["items"].items()}
    items = list(truth)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: None if req.url.startswith(("file:", "data:", "blob:"))
                    else errors.append(f"network request {req.url}"))
            page.goto((tmp_path / "study" / RS.PAGE_NAME).as_uri())
            page.fill("#reader-name", "Dr. Scripted")
            for i, item in enumerate(items):
                if i == 3:  # a reload keeps the answers, the position and the name (localStorage)
                    page.reload()
                    assert page.inner_text("#progress-text") == "Image 4 of 6 (3 answered)"
                    assert page.input_value("#reader-name") == "Dr. Scripted"
                assert page.get_attribute("#study-image", "alt") == f"study image {i + 1}"
                assert page.is_disabled("#next")
                # the reader is right on the first four items, calls the last two "real"
                page.click(f"#answer-{truth[item] if i < 4 else 'real'}")
                assert page.is_disabled("#next")  # a confidence is required before moving on
                page.click(f"#confidence-{1 + i % 3}")
                page.click("#next")
            assert page.is_visible("#download") and not page.is_visible("#study-image")
            with page.expect_download() as info:
                page.click("#download")
            download = info.value
            assert download.suggested_filename == "answers.csv"
            download.save_as(tmp_path / "answers.csv")
        finally:
            browser.close()
    assert errors == []
    rows = list(csv.DictReader(open(tmp_path / "answers.csv")))
    assert [r["item"] for r in rows] == items and {r["reader"] for r in rows} == {"Dr. Scripted"}
    assert {r["study"] for r in rows} == {key["study"]} and all(float(r["seconds"]) >= 0 for r in rows)
    assert evaluate.main(["--score_reader_study", str(tmp_path / "answers.csv"), "--key",
                          str(tmp_path / "study" / RS.KEY_NAME), "--reader_study_page",
                          str(tmp_path / "study" / RS.PAGE_NAME), "--output_dir", str(tmp_path / "score")]) == 0
    score = json.loads((tmp_path / "score" / "reader_study_score.json").read_text())
    expected = sum(truth[it] == ("real" if i >= 4 else truth[it]) for i, it in enumerate(items))
    assert score["n_answered"] == 6 and score["n_correct"] == expected and score["n_readers"] == 1
    assert list(score["per_reader"]) == ["Dr. Scripted"]
