"""The evaluation report: the answer first (a verdict box), then the tables, printed (100 columns) and in a
self-contained report.html whose figures (metrics/figures.py) are PNGs embedded as base64, so the file can be mailed
or committed on its own.

**The answer** (:func:`answer`): realism (the headline KID, and FID, beside the real-vs-real floor, with the ratio),
memorisation (synthetic images flagged as copies of a training image, of N) and the primary endpoint (tumour Dice,
combined − baseline, its CI and whether the CI excludes zero); a part that was not measured says so and why.

**Directions.** Each quantity has one name and a good direction (:data:`QUANTITIES`; the downstream metrics':
:data:`metrics.downstream.METRICS`). A floor verdict of metrics/generation.py ("above floor (2.3x)") becomes
"better than floor" or "worse than floor" by that direction (:func:`directed_verdict`): FID, KID, morphology
distances and MS-SSIM (a similarity within the set: lower = more diverse) are better low; IS and nearest-real SSIM
should sit at the floor (a nearest-real SSIM above it means closer to the training images than new real images
are, one below means less like them), so either side is worse.
"""
from __future__ import annotations

import base64
import html
import math
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Sequence

from metrics.downstream import METRICS, PRIMARY_METRIC
from metrics.morphology import FEATURES

__all__ = ["WIDTH", "Quantity", "QUANTITIES", "directed_verdict", "summary_rows", "outcome_rows", "comparison_rows",
           "answer", "format_answer", "format_table", "fit", "hang", "terminal_report", "render_html",
           "QUALITY_COLUMNS", "OUTCOME_COLUMNS", "COMPARISON_COLUMNS"]

WIDTH = 100   # columns of everything printed


@dataclass(frozen=True)
class Quantity:
    """One image-quality quantity: its name everywhere, its good direction ("lower", "higher", or "floor": best at
    the floor, either side worse) and what a synthetic value above / below the floor means."""

    name: str
    better: str
    above: str = ""
    below: str = ""


QUANTITIES: dict[str, Quantity] = {
    "kid": Quantity("KID", "lower"),
    "fid": Quantity("FID", "lower"),
    "fid_infinity": Quantity("FID∞ (extrapolated)", "lower"),
    "is": Quantity("IS", "floor", "higher Inception score than real images", "lower Inception score than real images"),
    "nearest_ssim": Quantity("nearest-real SSIM", "floor", "closer to the training images than new real ones",
                             "less like the training images than new real ones"),
    "ms_ssim_diversity": Quantity("MS-SSIM diversity", "lower", "less diverse than real (mode collapse?)",
                                  "more diverse than real"),
    "morphology": Quantity("morphology W1/std", "lower", "lesion shapes unlike real ones"),
}
BETTER_TEXT = {"lower": "lower", "higher": "higher", "floor": "at floor"}


def directed_verdict(raw: str, better: str, quantity: Quantity | None = None) -> tuple[str, str]:
    """(text, tone) of a floor verdict ("within floor", "above floor (2.3x)", "below floor (-0.08)") read in the
    quantity's good direction; tone is "good", "bad" or "neutral" (anything else, e.g. "n/a" or a reason)."""
    if raw.startswith("within floor"):
        return "within floor", "good"
    m = re.match(r"(above|below) floor(?: \((.*)\))?$", raw)
    if not m:
        return raw, "neutral"
    side, detail = m.groups()
    good = (better == "lower" and side == "below") or (better == "higher" and side == "above")
    meaning = (quantity.above if side == "above" else quantity.below) if quantity else ""
    text = f"{'better' if good else 'worse'} than floor" + (f" ({detail})" if detail else "")
    return text + (f": {meaning}" if meaning else ""), "good" if good else "bad"


# ============================================================================ the tables
def _pm(d: dict[str, Any] | None, fmt: str) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}" if d.get("std") else f"{d['mean']:{fmt}}"


def _unavailable(key: str, name: str, why: str) -> dict[str, str]:
    return {"key": key, "metric": name, "better": "", "synthetic": "unavailable", "floor": "", "verdict": why,
            "tone": "neutral"}


def _row(key: str, quantity: str, name: str, m: dict[str, Any] | None, fmt: str,
         n: int | None = None) -> dict[str, str]:
    q = QUANTITIES[quantity]
    if not m:
        return {**_unavailable(key, name, ""), "synthetic": "not run"}
    if "skipped" in m:
        return _unavailable(key, name, m["skipped"])
    n = m.get("n", n)
    text, tone = directed_verdict(m.get("verdict", ""), q.better, q)
    return {"key": key, "metric": name, "better": BETTER_TEXT[q.better], "synthetic": _pm(m["synthetic"], fmt),
            "floor": _pm(m["floor"], fmt) + (f" (N={n})" if n else ""), "verdict": text, "tone": tone}


def summary_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """Rows of the first table: every image-quality number beside its real-vs-real floor. Each row: key (the
    quantity's JSON key), metric (its name), better (good direction), synthetic, floor, verdict, tone."""
    rows: list[dict[str, str]] = []
    gen = metrics.get("generation")
    if gen and "skipped" not in gen:
        order = ("kid", "fid") if gen.get("headline") == "kid" else ("fid", "kid")
        for name in order + ("is",):
            label = QUANTITIES[name].name + (" (headline)" if name == gen.get("headline") else "")
            rows.append(_row(name, name, label, gen["all"].get(name), ".4f" if name == "kid" else ".2f"))
        inf = gen["all"].get("fid_infinity")
        if inf and "skipped" not in inf:
            rows.append({"key": "fid_infinity", "metric": QUANTITIES["fid_infinity"].name, "better": "lower",
                         "synthetic": f"{inf['synthetic']['value']:.2f}", "floor": f"{inf['floor']['value']:.2f}",
                         "verdict": "informational (noisy at small N)", "tone": "neutral"})
        for lab, blk in gen.get("per_class", {}).items():
            for name in ("kid", "fid"):
                if name in blk:
                    rows.append(_row(f"{name}_{lab}", name, f"{QUANTITIES[name].name} ({lab})", blk[name],
                                     ".4f" if name == "kid" else ".2f"))
    elif gen:
        rows.append(_unavailable("generation", "FID / KID / IS", gen["skipped"]))
    sim = metrics.get("similarity") or {}
    if "skipped" in sim:
        rows.append(_unavailable("similarity", "SSIM / MS-SSIM", sim["skipped"]))
    for key in ("nearest_ssim", "ms_ssim_diversity"):
        if key in sim:
            rows.append(_row(key, key, QUANTITIES[key].name, sim[key], ".3f"))
    morph = metrics.get("morphology") or {}
    if "skipped" in morph:
        rows.append(_unavailable("morphology", QUANTITIES["morphology"].name, morph["skipped"]))
    for lab, blk in morph.get("per_class", {}).items():
        name = f"{QUANTITIES['morphology'].name} ({lab})"
        if "skipped" in blk:
            rows.append(_unavailable(f"morphology_{lab}", name, blk["skipped"]))
        else:
            rows.append(_row(f"morphology_{lab}", "morphology", name, blk["mean_wasserstein"], ".3f", blk.get("n")))
    return rows


def outcome_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """Rows of the second table: memorisation flags, mask-image alignment and the downstream runs."""
    rows: list[dict[str, str]] = []
    mem = metrics.get("memorisation") or {}
    if "skipped" in mem:
        rows.append({"result": "memorisation", "value": "unavailable", "detail": mem["skipped"]})
    elif mem:
        held = mem.get("heldout_nearest_ncc", {})
        detail = f"held-out real: {mem.get('heldout_above_threshold', 0)} of {held.get('n', '?')}"
        meehan = mem.get("meehan", {})
        if "p_value" in meehan:
            detail += f"; P(syn. closer than held-out) {meehan['prob_synthetic_closer']:.2f}, p {meehan['p_value']:.2g}"
        rows.append({"result": f"copies (NCC >= {mem['threshold']:g} to a train image)",
                     "value": f"{mem['n_flagged']} of {mem['n_synthetic']}", "detail": detail})
    down = metrics.get("downstream") or {}
    align = down.get("alignment")
    if align and "skipped" in align:
        rows.append({"result": "mask-image alignment", "value": "unavailable", "detail": align["skipped"]})
    elif align:
        per = ", ".join(f"{k} {v['mean']:.3f}" for k, v in align.get("per_class", {}).items())
        rows.append({"result": "mask-image alignment Dice", "value": f"{align['all']['mean']:.3f}", "detail": per})
    comp = down.get("comparison")
    if comp and "skipped" in comp:
        rows.append({"result": "baseline vs combined", "value": "unavailable", "detail": comp["skipped"]})
    elif comp:
        rows.append({"result": "downstream runs, test images", "value": f"{comp['n_images']} images",
                     "detail": f"{comp['n_baseline_runs']} baseline + {comp['n_combined_runs']} combined run(s); "
                               + comp.get("ci_method", "paired bootstrap").split(" (")[0]})
    return rows


def _p(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2g}"


def comparison_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """Rows of the downstream table: each metric's baseline, combined, difference with its 95% CI, p, Holm p (or
    "primary": tested alone), good direction and N; tone good / bad when the CI excludes zero, else neutral."""
    comp = (metrics.get("downstream") or {}).get("comparison") or {}
    rows: list[dict[str, str]] = []
    order = list(METRICS)
    for key in sorted(comp.get("metrics", {}), key=lambda k: order.index(k) if k in order else len(order)):
        v = comp["metrics"][key]
        name = METRICS[key].name if key in METRICS else key
        if "skipped" in v:
            rows.append({"key": key, "metric": name, "baseline": "", "combined": "", "diff": v["skipped"], "p": "",
                         "holm": "", "better": v.get("better", ""), "n": "0", "tone": "neutral"})
            continue
        fmt = ".2f" if key.startswith("hd95") else ".3f"
        lo, hi, d = v["ci_low"], v["ci_high"], v["mean_diff"]
        excludes = lo > 0 or hi < 0
        good = (d > 0) == (v.get("better", "higher") == "higher")
        rows.append({"key": key, "metric": name, "baseline": f"{v['baseline']:{fmt}}",
                     "combined": f"{v['combined']:{fmt}}", "diff": f"{d:+{fmt}} [{lo:+{fmt}}, {hi:+{fmt}}]",
                     "p": _p(v.get("p_value")), "holm": "primary" if v.get("role") == "primary" else
                     _p(v.get("p_holm")), "better": v.get("better", ""), "n": str(v.get("n", "")),
                     "tone": ("good" if good else "bad") if excludes else "neutral"})
    return rows


QUALITY_COLUMNS = (("metric", "synthetic", "floor", "verdict"),
                   ("metric", "synthetic vs real", "real vs real (floor)", "verdict"))
QUALITY_HTML_COLUMNS = (("metric", "better", "synthetic", "floor", "verdict"),
                        ("metric", "better", "synthetic vs real", "real vs real (floor)", "verdict"))
OUTCOME_COLUMNS = (("result", "value", "detail"), ("result", "value", "detail"))
COMPARISON_COLUMNS = (("metric", "baseline", "combined", "diff", "p", "holm", "better"),
                      ("metric", "baseline", "combined", "change [95% CI]", "p", "Holm p", "better"))
COMPARISON_TITLE = ("Downstream: change = combined − baseline on the same real test images, 95% CI; the primary "
                    "endpoint (Dice) is tested alone, the other metrics' p are Holm-adjusted")
COMPARISON_HTML_COLUMNS = (COMPARISON_COLUMNS[0] + ("n",), COMPARISON_COLUMNS[1] + ("N",))


# ============================================================================ plain text, 100 columns
def fit(text: str, width: int = WIDTH) -> str:
    """``text`` cut to ``width`` characters, ending in "…" where it was cut."""
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"


def _wrap(text: str, width: int, lines: int) -> list[str]:
    """``text`` wrapped at ``width`` into at most ``lines`` lines, the last cut with "…" if text remains."""
    out = textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]
    if len(out) > lines:
        out = out[:lines - 1] + [fit(" ".join(out[lines - 1:]), width)]
    return out


def format_table(rows: Sequence[dict[str, str]], columns=QUALITY_COLUMNS, width: int = WIDTH,
                 last_lines: int = 2) -> str:
    """Plain-text table no wider than ``width``: the widest columns are narrowed to fit, their cells cut with
    "…"; the last column (free text) wraps onto up to ``last_lines`` lines first."""
    cols, heads = columns
    widths = [max([len(h)] + [len(str(r.get(c, ""))) for r in rows]) for c, h in zip(cols, heads)]
    floor = [min(w, max(len(h), 8)) for w, h in zip(widths, heads)]
    while sum(widths) + 2 * (len(widths) - 1) > width:
        over = sum(widths) + 2 * (len(widths) - 1) - width
        last = len(widths) - 1
        if widths[last] - over >= max(floor[last], 24):   # the last column (free text) takes the cut when it can
            widths[last] -= over
            continue
        k = max(range(len(widths)), key=lambda j: (widths[j] - floor[j], j))
        if widths[k] <= floor[k]:
            break
        widths[k] -= min(over, widths[k] - floor[k], max(1, widths[k] // 4))
    line = "  ".join(fit(h, w).ljust(w) for h, w in zip(heads, widths)).rstrip()
    out = [line, "-" * min(width, sum(widths) + 2 * (len(widths) - 1))]
    indent = " " * (sum(widths[:-1]) + 2 * (len(widths) - 1))
    for r in rows:
        tail = _wrap(str(r.get(cols[-1], "")), widths[-1], last_lines)
        out.append("  ".join([fit(str(r.get(c, "")), w).ljust(w) for c, w in zip(cols[:-1], widths)]
                             + [tail[0]]).rstrip())
        out += [indent + t for t in tail[1:]]
    return "\n".join(fit(x, width) for x in out)


def hang(text: str, width: int = WIDTH) -> str:
    """Lines of ``text`` longer than ``width`` wrapped, continuing under their last column (the text after the
    last run of two spaces) when that leaves room, else indented by 4."""
    out = []
    for line in text.splitlines():
        if len(line) <= width:
            out.append(line)
            continue
        cols = [m.end() for m in re.finditer(r"\S {2,}(?=\S)", line[:width])]
        indent = cols[-1] if cols and cols[-1] <= width - 30 else 4
        first, rest = line[:indent], line[indent:]
        body = textwrap.wrap(rest, width - indent, break_long_words=True, break_on_hyphens=False)
        out += [first + body[0]] + [" " * indent + b for b in body[1:]]
    return "\n".join(fit(x, width) for x in out)


# ============================================================================ the answer
def _skipped(metrics: dict[str, Any], *stages: str) -> bool:
    skip = (metrics.get("config") or {}).get("skip") or []
    return all(s in skip for s in stages)


def _ratio(s: float, f: float) -> str:
    return f"{s / f:.1f}x the floor" if f > 0 and s >= 0 else "no ratio: a value <= 0"


def _realism(metrics: dict[str, Any]) -> tuple[str, str]:
    gen = metrics.get("generation")
    if not gen:
        return ("not measured: FID/KID skipped with --skip" if _skipped(metrics, "fid", "kid") else
                "not measured: the FID/KID stage did not run"), "missing"
    if "skipped" in gen:
        return f"not measured: {gen['skipped']}", "missing"
    head = gen.get("headline", "kid")
    parts, tone = [], "missing"
    for key in (head, "fid" if head == "kid" else "kid"):
        blk = gen.get("all", {}).get(key)
        name = QUANTITIES[key].name
        if not blk or "skipped" in blk:
            parts.append(f"{name} not measured" + (f" ({blk['skipped']})" if blk else ""))
            continue
        s, f = blk["synthetic"].get("mean"), blk["floor"].get("mean")
        if s is None or f is None:
            parts.append(f"{name} n/a")
            continue
        fmt = ".4f" if key == "kid" else ".2f"
        text, t = directed_verdict(blk.get("verdict", ""), QUANTITIES[key].better, QUANTITIES[key])
        parts.append(f"{name}{' (headline)' if key == head else ''} {s:{fmt}} vs real-vs-real floor {f:{fmt}} "
                     f"({_ratio(s, f)}, N={blk.get('n', '?')}): {text}")
        if key == head:
            tone = t
    return "; ".join(parts), tone


def _memorisation(metrics: dict[str, Any]) -> tuple[str, str]:
    mem = metrics.get("memorisation")
    if not mem:
        return ("not measured: skipped with --skip memorisation" if _skipped(metrics, "memorisation") else
                "not measured: the memorisation stage did not run"), "missing"
    if "skipped" in mem:
        return f"not measured: {mem['skipped']}", "missing"
    held = mem.get("heldout_nearest_ncc", {})
    text = (f"{mem['n_flagged']} of {mem['n_synthetic']} synthetic images flagged as copies (NCC >= "
            f"{mem['threshold']:g} to a training image; held-out real images: {mem.get('heldout_above_threshold', 0)}"
            f" of {held.get('n', '?')})")
    return text, "good" if mem["n_flagged"] == 0 else "bad"


def _downstream(metrics: dict[str, Any]) -> tuple[str, str]:
    cfg = metrics.get("config") or {}
    down = metrics.get("downstream")
    if not down:
        if _skipped(metrics, "downstream"):
            return "not measured: skipped with --skip downstream", "missing"
        return ("not measured: no segmentation runs given (--baseline_run and --combined_run; see "
                "train_segmentation.py)"), "missing"
    if "skipped" in down:
        return f"not measured: {down['skipped']}", "missing"
    comp = down.get("comparison")
    if not comp:
        return ("not measured: the comparison needs --combined_run runs beside the "
                f"{len(cfg.get('baseline_run') or [])} --baseline_run run(s)"), "missing"
    if "skipped" in comp:
        return f"not measured: {comp['skipped']}", "missing"
    v = comp.get("metrics", {}).get(PRIMARY_METRIC, {})
    name = METRICS[PRIMARY_METRIC].name
    if "skipped" in v or not v:
        return f"not measured: {name}: {v.get('skipped', 'not in the comparison')}", "missing"
    d, lo, hi = v["mean_diff"], v["ci_low"], v["ci_high"]
    excludes = lo > 0 or hi < 0
    good = (d > 0) == (METRICS[PRIMARY_METRIC].better == "higher")
    reading = (("combined is better" if good else "combined is worse") if excludes else "no detectable change")
    holm = (down.get("multiplicity") or {}).get("holm", {})
    secondary = [(k, w) for k, w in comp["metrics"].items() if k != PRIMARY_METRIC and "p_holm" in w
                 and math.isfinite(w["p_holm"])]
    hits = [METRICS[k].name if k in METRICS else k for k, w in secondary if w["p_holm"] < 0.05]
    text = (f"tumour {name} change (combined − baseline, the primary endpoint): {d:+.3f} [95% CI {lo:+.3f}, "
            f"{hi:+.3f}] ({v['baseline']:.3f} -> {v['combined']:.3f}), p {_p(v.get('p_value'))} (tested alone; "
            f"Holm-adjusted p {_p(v.get('p_holm', v.get('p_value')))}): the CI {'excludes' if excludes else 'includes'}"
            f" zero, {reading}. "
            + (f"Secondary: {len(hits)} of {holm.get('m', len(secondary))} metrics with Holm p < 0.05"
               + (f" ({'; '.join(hits)}); " if hits else "; ") if secondary else "")
            + f"{comp['n_baseline_runs']} + {comp['n_combined_runs']} runs, {comp['n_images']} test images")
    return text, ("good" if good else "bad") if excludes else "neutral"


def answer(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """The verdict box: ``[{part, text, tone}]`` for realism, memorisation, downstream, then every loud warning
    (those starting "WARNING", e.g. a segmenter that predicts nothing); tone good / bad / neutral / missing."""
    parts = []
    for part, fn in (("realism", _realism), ("memorisation", _memorisation), ("downstream", _downstream)):
        text, tone = fn(metrics)
        parts.append({"part": part, "text": text, "tone": tone})
    for w in metrics.get("warnings", []):
        if w.startswith("WARNING"):
            parts.append({"part": "warning", "text": w, "tone": "bad"})
    return parts


TONE_TAG = {"good": "[good]", "bad": "[BAD]", "neutral": "[unclear]", "missing": "[missing]"}


def format_answer(parts: Sequence[dict[str, str]], width: int = WIDTH) -> str:
    """The verdict box as text, wrapped at ``width`` columns."""
    indent = 24
    out = ["=" * width, "THE ANSWER".center(width), "=" * width]
    for p in parts:
        head = f"{p['part']:<13} {TONE_TAG.get(p['tone'], ''):<9} "
        out += textwrap.wrap(p["text"], width, initial_indent=head.ljust(indent), subsequent_indent=" " * indent,
                             break_long_words=True, break_on_hyphens=False)
    out.append("=" * width)
    return "\n".join(fit(x, width) for x in out)


def terminal_report(metrics: dict[str, Any], plan_text: str = "", width: int = WIDTH) -> str:
    """Everything evaluate.py prints at the end, no line wider than ``width``: the answer, the image-quality
    table, memorisation / alignment, the downstream comparison, the plan's targets and the warnings."""
    blocks = [format_answer(metrics.get("answer") or answer(metrics), width),
              format_table(metrics.get("summary") or summary_rows(metrics), QUALITY_COLUMNS, width, last_lines=3)]
    outcomes = outcome_rows(metrics)
    if outcomes:
        blocks.append(format_table(outcomes, OUTCOME_COLUMNS, width))
    comparison = comparison_rows(metrics)
    if comparison:
        blocks.append("\n".join(textwrap.wrap(COMPARISON_TITLE, width)) + "\n"
                      + format_table(comparison, COMPARISON_COLUMNS, width))
    if plan_text:
        blocks.append(hang(plan_text, width))
    warns = metrics.get("warnings", [])
    if warns:
        blocks.append("\n".join(line for w in warns for line in textwrap.wrap(
            f"warning: {w}", width, subsequent_indent="    ", break_long_words=True, break_on_hyphens=False)))
    return "\n\n".join(blocks)


# ============================================================================ HTML
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}
th{background:#f2f2f2}.warn{color:#a15c00}.small{font-size:12px;color:#555}img{max-width:100%}
td.v-good{background:#e7f6e7}td.v-bad{background:#fbe9e7}td.v-neutral{background:#f4f4f4}
#verdict{border:3px solid #333;border-radius:6px;padding:.4em 1.2em;margin-bottom:1.5em;background:#fafafa}
#verdict h1{margin:.3em 0;font-size:1.5em}#verdict ul{list-style:none;padding:0}
#verdict li{margin:.45em 0;padding:.35em .6em;border-left:8px solid #999}
#verdict li.good{border-color:#2e7d32;background:#eef8ee}#verdict li.bad{border-color:#c62828;background:#fdeeee}
#verdict li.neutral{border-color:#f9a825;background:#fffbe8}#verdict li.missing{border-color:#999;background:#f2f2f2}
#verdict li.warning{font-weight:bold}figure{margin:1em 0}figcaption{font-size:12px;color:#555}"""


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _figure(fig_id: str, data: bytes, alt: str, caption: str) -> str:
    return (f'<figure id="{fig_id}">{_img(data, alt)}<figcaption>{html.escape(caption)}</figcaption></figure>')


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str], heads: Sequence[str] | None = None,
           tone_col: str = "verdict") -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in (heads or cols)) + "</tr>"]
    for r in rows:
        cells = []
        for c in cols:
            cls = f' class="v-{r["tone"]}"' if c == tone_col and r.get("tone") else ""
            cells.append(f"<td{cls}>{html.escape(str(r.get(c, '')))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _answer_html(parts: Sequence[dict[str, str]]) -> str:
    items = "".join(f"<li class='{p['tone']}{' warning' if p['part'] == 'warning' else ''}'><b>"
                    f"{html.escape(p['part'].capitalize())}</b> <span class='small'>{TONE_TAG.get(p['tone'], '')}"
                    f"</span><br>{html.escape(p['text'])}</li>" for p in parts)
    return (f"<section id='verdict' class='verdict'><h1>Synthetic data evaluation: the answer</h1><ul>{items}</ul>"
            "<p class='small'>good / BAD: the direction each quantity is judged in is in the tables below (the "
            "“better” column); unclear: a CI that includes zero; missing: not measured, and why.</p></section>")


def render_html(metrics: dict[str, Any], figures: dict[str, Any]) -> str:
    """The report; the verdict box is the first element of the body. ``figures`` (metrics/figures.py):
    {"samples": {label: (synthetic png, real png)}, "morphology": {label: png}, "nearest_ssim": png,
    "closest": (png, rows), "forest", "roc", "paired_dice", "confusion": png}."""
    e = html.escape
    inp = metrics.get("inputs", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Synthetic data evaluation</title>"
             f"<style>{_CSS}</style></head><body>" + _answer_html(metrics.get("answer") or answer(metrics)),
             f"<p class='small'>real: {e(str(inp.get('real_data')))} — synthetic: {e(str(inp.get('synthetic_data')))}"
             f" — {e(metrics.get('command', ''))}</p>",
             "<h2>Image quality beside the real-data floor</h2>",
             "<p class='small'>Each number compares the synthetic images with the real training images; the floor "
             "is the same number for held-out real images (val + test) at the same N — what a perfect generator "
             "would score. Synthetic sides are subsampled to that N (mean ± std over draws); floor spread from "
             "group-respecting re-splits of the real data. FID at small N is mostly bias: read it only beside its "
             "floor; KID is unbiased. “better”: the good direction (at floor: either side is worse); morphology: "
             f"the mean over {len(FEATURES)} lesion features of the Wasserstein-1 distance / real std.</p>",
             _table(metrics.get("summary") or summary_rows(metrics), *QUALITY_HTML_COLUMNS)]
    outcomes, comparison = outcome_rows(metrics), comparison_rows(metrics)
    if outcomes or comparison:
        parts.append("<h2>Privacy and downstream at a glance</h2>")
        if outcomes:
            parts.append(_table(outcomes, *OUTCOME_COLUMNS))
        if comparison:
            parts.append(f"<p class='small'>{e(COMPARISON_TITLE)}</p>"
                         + _table(comparison, *COMPARISON_HTML_COLUMNS, tone_col="diff"))
    weights = (metrics.get("generation") or {}).get("weights")
    if weights:
        parts.append(f"<p class='small'>Inception: {e(weights.get('name', ''))} (sha256 "
                     f"{e(str(weights.get('sha256'))[:16])}…) — {e(weights.get('note', ''))}</p>")
    warns = metrics.get("warnings", [])
    if warns:
        parts.append("<h3>Warnings</h3><ul>" + "".join(f"<li class='warn'>{e(w)}</li>" for w in warns) + "</ul>")
    parts += _samples_and_morphology(metrics, figures) + _memorisation_html(metrics, figures)
    parts += _downstream_html(metrics, figures)
    parts.append("<p class='small'>All numbers are in metrics.json beside this file.</p></body></html>")
    return "\n".join(parts)


def _samples_and_morphology(metrics: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    e = html.escape
    parts = []
    if figures.get("samples"):
        parts.append("<h2>Samples per class</h2><p class='small'>image with the mask outline in red; first row "
                     "synthetic, second row real training images</p>")
        for lab, (syn_png, real_png) in figures["samples"].items():
            parts.append(f"<h3>{e(lab)}</h3>{_img(syn_png, f'synthetic {lab}')}<br>{_img(real_png, f'real {lab}')}")
    morph = metrics.get("morphology") or {}
    if morph.get("per_class"):
        parts.append(f"<h2>Tumour morphology</h2><p class='small'>{e(QUANTITIES['morphology'].name)}: lower is "
                     "better</p>")
        for lab, blk in morph["per_class"].items():
            if "skipped" in blk:
                parts.append(f"<p>{e(lab)}: {e(blk['skipped'])}</p>")
                continue
            rows = []
            for f, v in blk["features"].items():
                text, tone = directed_verdict(v["wasserstein"]["verdict"], "lower", QUANTITIES["morphology"])
                rows.append({"feature": f, "synthetic mean": f"{v['synthetic_mean']:.3f}",
                             "real mean": f"{v['real_train_mean']:.3f}",
                             "W1/std": _pm(v["wasserstein"]["synthetic"], ".3f"),
                             "floor W1/std": _pm(v["wasserstein"]["floor"], ".3f"),
                             "KS": _pm(v["ks"]["synthetic"], ".3f"), "floor KS": _pm(v["ks"]["floor"], ".3f"),
                             "verdict": text, "tone": tone})
            parts.append(f"<h3>{e(lab)} (synthetic {blk['n_synthetic']}, real train {blk['n_real_train']}, "
                         f"held-out {blk['n_heldout']} lesions)</h3>")
            if rows:
                parts.append(_table(rows, [k for k in rows[0] if k != "tone"]))
            if lab in figures.get("morphology", {}):
                parts.append(_img(figures["morphology"][lab], f"morphology {lab}"))
    if figures.get("nearest_ssim"):
        parts.append(f"<h2>{e(QUANTITIES['nearest_ssim'].name)}</h2>" + _img(figures["nearest_ssim"],
                                                                             QUANTITIES["nearest_ssim"].name))
    return parts


def _memorisation_html(metrics: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    e = html.escape
    mem = metrics.get("memorisation") or {}
    if not mem:
        return []
    if "skipped" in mem:
        return [f"<h2>Memorisation</h2><p>{e(mem['skipped'])}</p>"]
    held = mem.get("heldout_nearest_ncc", {})
    parts = ["<h2>Memorisation</h2>",
             f"<p>{mem['n_flagged']} of {mem['n_synthetic']} synthetic images reach NCC ≥ {mem['threshold']} with a "
             f"training image ({e(mem['similarity'])}). Held-out real images' nearest-training NCC: median "
             f"{held.get('median', float('nan')):.3f}, p99 {held.get('p99', float('nan')):.3f}, max "
             f"{held.get('max', float('nan')):.3f} ({mem.get('heldout_above_threshold', 0)} above the threshold) — "
             "the natural reference for the threshold.</p>"]
    if "meehan" in mem and "p_value" in mem["meehan"]:
        m = mem["meehan"]
        parts.append(f"<p>Synthetic vs held-out distance to the training set (Mann–Whitney, one-sided): "
                     f"P(synthetic closer) = {m['prob_synthetic_closer']:.2f}, p = {m['p_value']:.3g} — "
                     f"{e(m['reading'])}.</p>")
    if mem.get("threshold_warning"):
        parts.append(f"<p class='warn'>{e(mem['threshold_warning'])}</p>")
    if figures.get("closest"):
        png_bytes, rows = figures["closest"]
        parts.append("<h3>Closest pairs (synthetic | nearest training image)</h3>")
        parts.append(_table(rows, ("synthetic_id", "train_id", "ncc")))
        parts.append(_img(png_bytes, "closest pairs"))
    return parts


def _downstream_html(metrics: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    e = html.escape
    down = metrics.get("downstream")
    if not down:
        return []
    parts = ["<h2>Downstream</h2>"]
    align = down.get("alignment")
    if align and "skipped" in align:
        parts.append(f"<h3>Mask–image alignment</h3><p>{e(align['skipped'])}</p>")
    elif align:
        rows = [{"class": k, "Dice": f"{v['mean']:.3f}", "N": v["n"], "empty masks": f"{v['empty_mask_fraction']:.2f}",
                 "empty predictions": f"{v['empty_prediction_fraction']:.2f}"} for k, v in align["per_class"].items()]
        parts.append(f"<h3>Mask–image alignment</h3><p class='small'>{e(align['note'])}</p>"
                     + _table(rows, list(rows[0])))
    comp = down.get("comparison")
    if comp and "skipped" in comp:
        parts.append(f"<h3>Baseline vs combined</h3><p>{e(comp['skipped'])}</p>")
    elif comp:
        parts.append(f"<h3>Baseline vs combined</h3><p class='small'>{e(comp.get('note', ''))}</p>")
        if figures.get("forest"):
            parts.append(_figure("forest-plot", figures["forest"], "forest plot: combined − baseline per metric with "
                                 "95% CI, primary endpoint marked, Holm-adjusted p",
                                 "Each metric's combined − baseline difference with its 95% CI; dashed line: no "
                                 "difference; the primary endpoint (tumour Dice) in bold, tested alone; every other "
                                 "metric's p Holm-adjusted."))
        for key, fig_id, alt, caption, missing in (
                ("roc", "roc-curve", "ROC curves of the malignant head, baseline vs combined",
                 "Malignant vs benign tumour test images, scored by the class head's malignant probability.",
                 "No ROC curve: the runs' per_image_test.csv hold no prob_malignant (no class head)."),
                ("paired_dice", "paired-dice", "per-image Dice, baseline vs combined, paired by test image",
                 "One line per lesion test image, from its baseline Dice to its combined Dice.", ""),
                ("confusion", "confusion-matrix", "benign / malignant confusion matrix per arm",
                 "Rows: true class, columns: predicted class, over the tumour test images.",
                 "No confusion matrix: the runs predicted no class.")):
            if figures.get(key):
                parts.append(_figure(fig_id, figures[key], alt, caption))
            elif missing:
                parts.append(f"<p class='small'>{e(missing)}</p>")
    return parts
