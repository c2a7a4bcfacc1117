"""The "Turing test" reader study: can experts tell real breast-ultrasound images from synthetic ones?

:func:`build_reader_study` writes two files:

* ``reader_study.html`` — one self-contained page (images as PNG data URIs, inline CSS/JS, no network; works
  from ``file://``) that shows N shuffled images, about half real (held-out val+test, never the training images
  a generator could copy) and half synthetic, balanced by class. The reader answers real / synthetic with a
  confidence of 1-3 and downloads ``answers.csv`` at the end. Items are opaque numbers (item_001, ...); every
  image is re-encoded from its pixels the same way, so neither the page nor its order says which is which.
* ``reader_study_key.json`` — the sealed key (item -> source, id, label, dataset), kept by the organiser. It
  records the page's sha256 and the study code the page writes into every answer row, so answers, page and key
  can be matched.

:func:`score_reader_study` scores one or several readers' ``answers.csv`` (concatenated downloads are fine):
accuracy, sensitivity (synthetic called synthetic), specificity, AUC of a graded "synthetic" score (+c for
synthetic with confidence c, -c for real; Mann-Whitney, ties half) and an exact two-sided binomial test of the
accuracy against chance (0.5), pooled, per reader and per class.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

from common.errors import UserError
from common.io import atomic_write_json, atomic_write_text, encode_png, sha256_file

PAGE_NAME, KEY_NAME = "reader_study.html", "reader_study_key.json"
KEY_FORMAT = "busdiff-reader-study-key/1"
CONFIDENCE = {1: "guess", 2: "fairly sure", 3: "certain"}
REQUIRED_COLUMNS = ("item", "answer", "confidence")
CSV_COLUMNS = ("study", "session", "reader", "item", "answer", "confidence", "seconds")


# ============================================================================ building the page
def _fill(k: int, capacity: dict[str, int]) -> dict[str, int]:
    """Spread ``k`` picks over classes as evenly as their capacity allows (fewest-first, class order on ties)."""
    out = {c: 0 for c in capacity}
    while k > 0:
        open_ = [c for c in capacity if out[c] < capacity[c]]
        if not open_:
            break
        out[min(open_, key=lambda c: out[c])] += 1
        k -= 1
    return out


def _select(real_rows, syn_rows, n: int, rng: np.random.Generator, real_dir, syn_dir, splits) -> dict[str, list]:
    """About n/2 rows from each side, class-balanced, with the same class mix on both sides where possible."""
    classes = [c for c in ("benign", "malignant", "normal") if any(r["label"] == c for r in syn_rows)]
    real_rows = [r for r in real_rows if r["label"] in classes]
    n_syn = n // 2
    n_real = n - n_syn
    if n % 2 and rng.random() < 0.5:  # which side gets the odd image is itself random
        n_real, n_syn = n_syn, n_real
    for where, rows, need, what in ((real_dir, real_rows, n_real, f"real {'+'.join(splits)} images of class(es) "
                                     f"{', '.join(classes)} (the synthetic set's classes)"),
                                    (syn_dir, syn_rows, n_syn, "synthetic images")):
        if len(rows) < need:
            raise UserError(f"{where}: {len(rows)} {what}, a {n}-image study needs {need}; lower --reader_study "
                            "or give a bigger dataset")
    pools = {side: {c: [r for r in rows if r["label"] == c] for c in classes}
             for side, rows in (("real", real_rows), ("synthetic", syn_rows))}
    joint = {c: min(len(pools["real"][c]), len(pools["synthetic"][c])) for c in classes}
    picks: dict[str, list] = {}
    for side, k in (("real", n_real), ("synthetic", n_syn)):
        base = _fill(k, joint)
        extra = _fill(k - sum(base.values()), {c: len(pools[side][c]) - base[c] for c in classes})
        picks[side] = []
        for c in classes:
            idx = rng.choice(len(pools[side][c]), base[c] + extra[c], replace=False)
            picks[side] += [pools[side][c][i] for i in sorted(idx)]
    return picks


def build_reader_study(real_dataset_dir: str | Path, synthetic_dataset_dir: str | Path, n: int,
                       output_dir: str | Path, seed: int = 0, real_splits: Sequence[str] = ("val", "test"),
                       command: str | None = None) -> dict[str, Any]:
    """Write ``reader_study.html`` and ``reader_study_key.json`` into ``output_dir``; return the key."""
    from data.pairs import open_pair_dataset
    if n < 2:
        raise UserError(f"--reader_study: a study needs at least 2 images (one real, one synthetic), got {n}")
    real, syn = open_pair_dataset(real_dataset_dir), open_pair_dataset(synthetic_dataset_dir)
    if real.img_size != syn.img_size:
        raise UserError(f"image sizes differ: {real_dataset_dir} is {real.img_size} px, {synthetic_dataset_dir} is "
                        f"{syn.img_size} px (a reader could tell them apart by size alone)")
    syn_rows = syn.select(source="synthetic") or syn.rows
    rng = np.random.default_rng(seed)
    picks = _select(real.select(split=tuple(real_splits), source="real"), syn_rows, n, rng, real_dataset_dir,
                    synthetic_dataset_dir, real_splits)
    entries = []
    for side, ds, root in (("real", real, real_dataset_dir), ("synthetic", syn, synthetic_dataset_dir)):
        images, _ = ds.load(picks[side])
        entries += [(side, row, str(root), str(ds.image_path(row["id"])), encode_png(img))
                    for row, img in zip(picks[side], images)]
    entries = [entries[i] for i in rng.permutation(len(entries))]
    width = max(3, len(str(n)))
    names = [f"item_{i + 1:0{width}d}" for i in range(n)]
    study = hashlib.sha256(json.dumps([seed, n, [hashlib.sha256(e[4]).hexdigest() for e in entries]]).encode()
                           ).hexdigest()[:12]
    page = render_page(study, [(name, e[4]) for name, e in zip(names, entries)])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    page_sha = hashlib.sha256(page.encode("utf-8")).hexdigest()
    old_key = out / KEY_NAME
    if old_key.is_file():
        try:
            old_sha = json.loads(old_key.read_text()).get("page_sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            old_sha = None
        if old_sha != page_sha:
            raise UserError(f"{old_key}: already holds the key of a different study (its page may be with readers "
                            "already); choose another --output_dir or move that key away first")
    key = {
        "format": KEY_FORMAT, "study": study, "page": PAGE_NAME, "page_sha256": page_sha, "seed": seed, "n": n,
        "n_real": len(picks["real"]), "n_synthetic": len(picks["synthetic"]),
        "per_class": {side: {c: sum(r["label"] == c for r in picks[side]) for c in
                             sorted({r["label"] for r in picks[side]})} for side in picks},
        "parameters": {"real_dataset_dir": str(real_dataset_dir), "synthetic_dataset_dir": str(synthetic_dataset_dir),
                       "n": n, "seed": seed, "real_splits": list(real_splits), "command": command},
        "confidence_scale": {str(k): v for k, v in CONFIDENCE.items()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "items": {name: {"source": side, "id": row["id"], "label": row["label"], "dataset": root, "image": path}
                  for name, (side, row, root, path, _) in zip(names, entries)},
    }
    atomic_write_text(out / PAGE_NAME, page)
    atomic_write_json(out / KEY_NAME, key)
    return key


# ============================================================================ scoring
def _auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Mann-Whitney AUC: P(score of a positive > score of a negative), ties counted half."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = stats.rankdata(scores)  # average ranks: a tie contributes one half
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _metrics(truth: np.ndarray, answer: np.ndarray, conf: np.ndarray) -> dict[str, Any]:
    """truth / answer: True = synthetic."""
    n = len(truth)
    correct = int((truth == answer).sum())
    pos, neg = truth, ~truth
    score = np.where(answer, conf, -conf).astype(float)
    return {"n_answered": n, "n_correct": correct, "accuracy": correct / n if n else None,
            "sensitivity": float((answer & pos).sum() / pos.sum()) if pos.any() else None,
            "specificity": float((~answer & neg).sum() / neg.sum()) if neg.any() else None,
            "auc": _auc(score, truth),
            "binomial_p": float(stats.binomtest(correct, n, 0.5, alternative="two-sided").pvalue) if n else None,
            "n_synthetic": int(pos.sum()), "n_real": int(neg.sum())}


def load_key(key_json: str | Path) -> dict[str, Any]:
    path = Path(key_json)
    if not path.is_file():
        raise UserError(f"{path}: key file not found")
    try:
        key = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT or not isinstance(key.get("items"), dict):
        raise UserError(f"{path}: not a reader-study key (expected format {KEY_FORMAT!r} with an 'items' table; "
                        "it is written by evaluate.py --reader_study)")
    bad = [k for k, v in key["items"].items() if not isinstance(v, dict) or v.get("source") not in ("real", "synthetic")]
    if bad:
        raise UserError(f"{path}: item {bad[0]} has no source real|synthetic (edited by hand?)")
    return key


def read_answers(answers_csv: str | Path, key: dict[str, Any], key_path: str | Path) -> list[dict[str, Any]]:
    """Validated answer rows (several readers' downloads may be concatenated, header lines included)."""
    path = Path(answers_csv)
    if not path.is_file():
        raise UserError(f"{path}: answers file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            raw = [(reader.line_num, r) for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc})") from None
    if not columns:
        raise UserError(f"{path}: empty file (no header, no answers)")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (need at least {','.join(REQUIRED_COLUMNS)})")
    rows, seen = [], {}
    for line, r in raw:
        r = {(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None}
        if r.get("item") == "item":  # the header of a concatenated download
            continue
        item, answer = r.get("item", ""), r.get("answer", "").lower()
        if item not in key["items"]:
            raise UserError(f"{path}: line {line}: unknown item {item!r} (not in {key_path}; answers for another "
                            "study?)")
        if answer not in ("real", "synthetic"):
            raise UserError(f"{path}: line {line}: answer must be real or synthetic, got {r.get('answer')!r}")
        try:
            conf = int(r.get("confidence", ""))
        except ValueError:
            conf = 0
        if conf not in CONFIDENCE:
            raise UserError(f"{path}: line {line}: confidence must be 1, 2 or 3, got {r.get('confidence')!r}")
        if r.get("study") and key.get("study") and r["study"] != key["study"]:
            raise UserError(f"{path}: line {line}: answers are for study {r['study']} but {key_path} is the key of "
                            f"study {key['study']} (page sha256 {str(key.get('page_sha256'))[:12]}...): wrong key")
        who = (r.get("reader", ""), r.get("session", ""))
        if (who, item) in seen:
            name = who[0] or "an unnamed reader"
            raise UserError(f"{path}: line {line}: {name} answered {item} twice (first on line {seen[who, item]}; "
                            "the same download concatenated twice?)")
        seen[who, item] = line
        try:
            seconds = float(r["seconds"]) if r.get("seconds") else None
        except ValueError:
            seconds = None
        rows.append({"who": who, "item": item, "answer": answer, "confidence": conf, "seconds": seconds})
    if not rows:
        raise UserError(f"{path}: no answers (only a header)")
    return rows


def score_reader_study(answers_csv: str | Path, key_json: str | Path,
                       page_html: str | Path | None = None) -> dict[str, Any]:
    """Score ``answers_csv`` against the sealed key; ``page_html`` (optional) is checked against the key's hash."""
    key = load_key(key_json)
    if page_html is not None:
        if not Path(page_html).is_file():
            raise UserError(f"{page_html}: page not found")
        if sha256_file(page_html) != key.get("page_sha256"):
            raise UserError(f"{key_json}: page sha256 {str(key.get('page_sha256'))[:12]}... does not match "
                            f"{page_html} ({sha256_file(page_html)[:12]}...): this key belongs to another page")
    rows = read_answers(answers_csv, key, key_json)
    items = key["items"]
    # reader names: the typed name, or "anonymous"; sessions tell apart readers who share a name
    who_list = list(dict.fromkeys(r["who"] for r in rows))
    base = {w: w[0] or "anonymous" for w in who_list}
    names = {w: base[w] if sum(base[v] == base[w] for v in who_list) == 1 else f"{base[w]} [{w[1] or '?'}]"
             for w in who_list}

    def block(sub: list[dict[str, Any]]) -> dict[str, Any]:
        truth = np.array([items[r["item"]]["source"] == "synthetic" for r in sub], bool)
        answer = np.array([r["answer"] == "synthetic" for r in sub], bool)
        return _metrics(truth, answer, np.array([r["confidence"] for r in sub], float))

    result: dict[str, Any] = {"study": key.get("study"), "n_items": len(items), "n_readers": len(who_list),
                              **block(rows), "per_reader": {}, "per_class": {}, "warnings": []}
    for w in who_list:
        sub = [r for r in rows if r["who"] == w]
        secs = [r["seconds"] for r in sub if r["seconds"] is not None]
        result["per_reader"][names[w]] = {**block(sub), "median_seconds": float(np.median(secs)) if secs else None}
        if len(sub) < len(items):
            result["warnings"].append(f"{names[w]} answered {len(sub)} of {len(items)} items")
    for label in sorted({items[r["item"]]["label"] for r in rows}):
        sub = [r for r in rows if items[r["item"]]["label"] == label]
        m = block(sub)
        result["per_class"][label] = {"n_answered": m["n_answered"], "accuracy": m["accuracy"],
                                      "sensitivity": m["sensitivity"], "specificity": m["specificity"]}
    if len(who_list) > 1:
        result["warnings"].append("pooled binomial p treats every answer as independent; see per_reader")
    return result


def format_score(result: dict[str, Any]) -> str:
    def f(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    def line(name, m):
        return (f"  {name:<22} n={m['n_answered']:<4} accuracy {f(m['accuracy'])}  sensitivity {f(m['sensitivity'])}"
                f"  specificity {f(m['specificity'])}  AUC {f(m.get('auc'))}  binomial p {f(m.get('binomial_p'), '.3g')}")
    out = [f"reader study {result['study']}: {result['n_answered']} answers from {result['n_readers']} reader(s) "
           f"on {result['n_items']} items (chance = 0.5; sensitivity = synthetic called synthetic)",
           line("all readers", result)]
    out += [line(name, m) for name, m in result["per_reader"].items()]
    out += [f"  class {label:<16} n={m['n_answered']:<4} accuracy {f(m['accuracy'])}"
            for label, m in result["per_class"].items()]
    out += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(out)


# ============================================================================ the page
def render_page(study: str, items: Sequence[tuple[str, bytes]]) -> str:
    """The page: ``items`` are (opaque item name, PNG bytes) in display order; nothing else item-specific."""
    data = json.dumps([[name, "data:image/png;base64," + base64.b64encode(png).decode("ascii")]
                       for name, png in items])
    return (_PAGE.replace("__STUDY__", json.dumps(study)).replace("__ITEMS__", data)
            .replace("__N__", str(len(items))).replace("__CONF__", json.dumps({str(k): v for k, v in CONFIDENCE.items()})))


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>Reader study: real or synthetic?</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#111;color:#eee}
main{max-width:900px;margin:0 auto;padding:12px 16px;text-align:center}
p.help{color:#bbb;font-size:.95em;text-align:left}
#viewer img{width:min(88vw,64vh,640px);height:auto;image-rendering:pixelated;background:#000;border:1px solid #444}
.row{margin:10px 0}
button{font-size:1.05em;padding:8px 16px;margin:3px;border-radius:6px;border:1px solid #666;background:#2a2a2a;color:#eee;cursor:pointer}
button.on{background:#2f6fd0;border-color:#8bb4f0}
button:disabled{opacity:.4;cursor:default}
progress{width:60%;height:12px}
input{font-size:1em;padding:4px 8px}
.hidden{display:none}
</style></head>
<body><main>
<h1>Real or synthetic?</h1>
<p class="help">Each image is a breast-ultrasound image: either a real scan or one made by a generative model
(about half of each, in random order). For each image choose <b>Real</b> or <b>Synthetic</b>, then how sure you are,
then <b>Next</b>. Keys: R / S, 1 / 2 / 3, Enter, arrow keys. Progress is kept in this browser, so you can close the
page and come back. At the end, download your answers and send the file back.</p>
<div class="row"><label>Your name (optional): <input id="reader-name" autocomplete="off"></label></div>
<div class="row"><span id="progress-text"></span><br><progress id="progress" max="__N__" value="0"></progress></div>
<section id="viewer">
<div class="row"><img id="study-image" alt="study image"></div>
<div class="row"><button id="answer-real" data-answer="real">Real</button>
<button id="answer-synthetic" data-answer="synthetic">Synthetic</button></div>
<div class="row">How sure? <span id="confidence"></span></div>
<div class="row"><button id="back">&larr; Back</button> <button id="next">Next &rarr;</button></div>
</section>
<section id="done" class="hidden">
<h2>All __N__ images answered. Thank you!</h2>
<div class="row"><button id="download">Download answers (CSV)</button></div>
<div class="row"><button id="review">Review my answers</button> <button id="restart">Start over as a new reader</button></div>
</section>
</main>
<script>
(function () {
"use strict";
var STUDY = __STUDY__, ITEMS = __ITEMS__, CONF = __CONF__, STORE = "reader-study:" + STUDY;
var $ = function (id) { return document.getElementById(id); };
function fresh() {
  return {name: "", pos: 0, answers: {}, session: Math.random().toString(36).slice(2, 10)};
}
var state = fresh();
try { var saved = JSON.parse(localStorage.getItem(STORE)); if (saved && saved.answers) state = saved; } catch (e) {}
function save() { try { localStorage.setItem(STORE, JSON.stringify(state)); } catch (e) {} }
var shownAt = performance.now();
Object.keys(CONF).forEach(function (k) {
  var b = document.createElement("button");
  b.id = "confidence-" + k; b.textContent = k + " " + CONF[k]; b.dataset.confidence = k;
  b.onclick = function () { choose(null, parseInt(k, 10)); };
  $("confidence").appendChild(b);
});
function current() { return state.answers[ITEMS[state.pos][0]] || {}; }
function complete(a) { return a.answer && a.confidence; }
function render() {
  var done = state.pos >= ITEMS.length;
  $("viewer").classList.toggle("hidden", done);
  $("done").classList.toggle("hidden", !done);
  var n = ITEMS.filter(function (it) { return complete(state.answers[it[0]] || {}); }).length;
  $("progress").value = n;
  $("progress-text").textContent = done ? "Finished: " + n + " of " + ITEMS.length + " answered" :
    "Image " + (state.pos + 1) + " of " + ITEMS.length + " (" + n + " answered)";
  $("reader-name").value = state.name;
  if (done) return;
  $("study-image").src = ITEMS[state.pos][1];
  $("study-image").alt = "study image " + (state.pos + 1);
  paint(current());
  $("back").disabled = state.pos === 0;
  shownAt = performance.now();
}
function paint(a) {
  ["real", "synthetic"].forEach(function (k) { $("answer-" + k).classList.toggle("on", a.answer === k); });
  Object.keys(CONF).forEach(function (k) { $("confidence-" + k).classList.toggle("on", a.confidence === +k); });
  $("next").disabled = !complete(a);
}
function choose(answer, confidence) {
  if (state.pos >= ITEMS.length) return;
  var item = ITEMS[state.pos][0], a = state.answers[item] || {seconds: 0};
  if (answer) a.answer = answer;
  if (confidence) a.confidence = confidence;
  state.answers[item] = a; save(); paint(a);
}
function move(step) {
  if (state.pos < ITEMS.length) {
    var a = current();
    if (step > 0 && !complete(a)) return;
    if (a.answer) a.seconds = Math.round(((a.seconds || 0) + (performance.now() - shownAt) / 1000) * 10) / 10;
  }
  state.pos = Math.max(0, Math.min(ITEMS.length, state.pos + step)); save(); render();
}
function cell(v) { v = String(v); return /[",\n\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
function csvText() {
  var lines = ["study,session,reader,item,answer,confidence,seconds"];
  ITEMS.forEach(function (it) {
    var a = state.answers[it[0]];
    if (a && complete(a)) lines.push([STUDY, state.session, state.name, it[0], a.answer, a.confidence,
                                      a.seconds || 0].map(cell).join(","));
  });
  return lines.join("\n") + "\n";
}
$("answer-real").onclick = function () { choose("real"); };
$("answer-synthetic").onclick = function () { choose("synthetic"); };
$("next").onclick = function () { move(1); };
$("back").onclick = function () { move(-1); };
$("review").onclick = function () { state.pos = 0; save(); render(); };
$("reader-name").oninput = function () { state.name = this.value; save(); };
$("download").onclick = function () {
  var url = URL.createObjectURL(new Blob([csvText()], {type: "text/csv"}));
  var link = document.createElement("a");
  link.href = url; link.download = "answers.csv"; document.body.appendChild(link); link.click();
  setTimeout(function () { URL.revokeObjectURL(url); link.remove(); }, 1000);
};
$("restart").onclick = function () {
  if (confirm("Clear all answers in this browser and start over as a new reader? Download your answers first.")) {
    state = fresh(); save(); render();
  }
};
document.addEventListener("keydown", function (e) {
  if (e.target.tagName === "INPUT") return;
  var k = e.key.toLowerCase();
  if (k === "r") choose("real"); else if (k === "s") choose("synthetic");
  else if (CONF[k]) choose(null, +k);
  else if (k === "enter" || k === "arrowright") move(1); else if (k === "arrowleft") move(-1);
});
render();
})();
</script>
</body></html>
"""


def built_message(key: dict, out) -> str:
    """What evaluate.py --reader_study prints once the page and its key are written to ``out``."""
    from pathlib import Path
    out = Path(out)
    return (f"wrote {out / PAGE_NAME}: {key['n']} images ({key['n_real']} real, {key['n_synthetic']} synthetic; "
            f"study {key['study']})\nwrote {out / KEY_NAME}: the sealed key\n"
            "send the HTML page to the readers (it opens offline in any browser; each reader downloads answers.csv at "
            "the end); keep the key private. Then score:\n"
            f"  python evaluate.py --score_reader_study answers.csv --key {out / KEY_NAME} --output_dir {out}")
