"""The evaluation report: the summary table (printed and in HTML), figures, and a self-contained report.html.

Every figure is a PNG embedded as base64, so the HTML file can be mailed or committed on its own. The first table
reads: metric | synthetic vs real | real vs real (floor) | verdict.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

import cv2
import numpy as np

from metrics.downstream import METRICS
from metrics.morphology import FEATURES


# ============================================================================ summary table
def _pm(d: dict[str, Any] | None, fmt: str) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}" if d.get("std") else f"{d['mean']:{fmt}}"


def _row(name: str, m: dict[str, Any] | None, fmt: str, n: int | None = None) -> dict[str, str]:
    if not m:
        return {"metric": name, "synthetic": "not run", "floor": "", "verdict": ""}
    if "skipped" in m:
        return {"metric": name, "synthetic": "unavailable", "floor": "", "verdict": m["skipped"]}
    n = m.get("n", n)
    return {"metric": name, "synthetic": _pm(m["synthetic"], fmt),
            "floor": _pm(m["floor"], fmt) + (f" (N={n})" if n else ""), "verdict": m.get("verdict", "")}


def summary_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """Rows of the first table: every image-quality number beside its real-vs-real floor."""
    rows: list[dict[str, str]] = []
    gen = metrics.get("generation")
    if gen and "skipped" not in gen:
        order = ("kid", "fid") if gen.get("headline") == "kid" else ("fid", "kid")
        for name in order + ("is",):
            label = {"fid": "FID", "kid": "KID", "is": "IS"}[name]
            if name == gen.get("headline"):
                label += " (headline)"
            rows.append(_row(label, gen["all"].get(name), ".4f" if name == "kid" else ".2f"))
        inf = gen["all"].get("fid_infinity")
        if inf and "skipped" not in inf:
            rows.append({"metric": "FID∞ (extrapolated)", "synthetic": f"{inf['synthetic']['value']:.2f}",
                         "floor": f"{inf['floor']['value']:.2f}", "verdict": "informational (noisy at small N)"})
        for lab, blk in gen.get("per_class", {}).items():
            for name in ("kid", "fid"):
                if name in blk:
                    rows.append(_row(f"{name.upper()} ({lab})", blk[name], ".4f" if name == "kid" else ".2f"))
    elif gen:
        rows.append({"metric": "FID / KID / IS", "synthetic": "unavailable", "floor": "", "verdict": gen["skipped"]})
    sim = metrics.get("similarity") or {}
    if "skipped" in sim:
        rows.append({"metric": "SSIM / MS-SSIM", "synthetic": "unavailable", "floor": "", "verdict": sim["skipped"]})
    if "nearest_ssim" in sim:
        rows.append(_row("nearest-real SSIM (mean)", sim["nearest_ssim"], ".3f"))
    if "ms_ssim_diversity" in sim:
        rows.append(_row("MS-SSIM within set (diversity)", sim["ms_ssim_diversity"], ".3f"))
    morph = metrics.get("morphology") or {}
    if "skipped" in morph:
        rows.append({"metric": "morphology", "synthetic": "unavailable", "floor": "", "verdict": morph["skipped"]})
    for lab, blk in morph.get("per_class", {}).items():
        if "skipped" in blk:
            rows.append({"metric": f"morphology ({lab})", "synthetic": "unavailable", "floor": "",
                         "verdict": blk["skipped"]})
        else:
            rows.append(_row(f"morphology W1/std, mean of {len(FEATURES)} ({lab})", blk["mean_wasserstein"], ".3f",
                             blk.get("n")))
    return rows


_DOWNSTREAM_NAMES = {k: m.name for k, m in METRICS.items()}   # one name per quantity (metrics/downstream.py)


def outcome_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """Rows of the second table: memorisation flags, mask-image alignment and baseline vs combined (with CIs)."""
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
        for key in sorted(comp["metrics"], key=lambda k: list(_DOWNSTREAM_NAMES).index(k)
                          if k in _DOWNSTREAM_NAMES else 99):
            v = comp["metrics"][key]
            if "skipped" in v:
                rows.append({"result": _DOWNSTREAM_NAMES.get(key, key), "value": "unavailable",
                             "detail": v["skipped"]})
                continue
            fmt = ".2f" if key.startswith("hd95") else ".3f"
            rows.append({"result": f"{_DOWNSTREAM_NAMES.get(key, key)}: baseline -> combined",
                         "value": f"{v['baseline']:{fmt}} -> {v['combined']:{fmt}}",
                         "detail": f"{v['mean_diff']:+{fmt}} [{v['ci_low']:+{fmt}}, {v['ci_high']:+{fmt}}] 95% CI, "
                                   f"p {v['p_value']:.2g}" + (" (primary)" if v.get("role") == "primary" else
                                                              f", Holm p {v['p_holm']:.2g}" if "p_holm" in v else "")
                                   + f" ({v['better']} is better)"})
        rows.append({"result": "downstream runs and test images", "value": "",
                     "detail": f"{comp['n_baseline_runs']} baseline + {comp['n_combined_runs']} combined run(s), "
                               f"{comp['n_images']} real test images, "
                               + comp.get("ci_method", "paired bootstrap").split(" (")[0]})
    return rows


QUALITY_COLUMNS = (("metric", "synthetic", "floor", "verdict"),
                   ("metric", "synthetic vs real", "real vs real (floor)", "verdict"))
OUTCOME_COLUMNS = (("result", "value", "detail"), ("result", "value", "detail"))


def format_table(rows: Sequence[dict[str, str]], columns=QUALITY_COLUMNS, last_width: int = 70) -> str:
    """Plain-text table (the printed summary); the last column is cut at ``last_width`` characters."""
    cols, heads = columns
    widths = [max(len(h), *(len(r[c]) for r in rows)) if rows else len(h) for c, h in zip(cols, heads)]
    widths[-1] = min(widths[-1], last_width)
    line = "  ".join(h.ljust(w) for h, w in zip(heads, widths))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(r[c][:w].ljust(w) for c, w in zip(cols, widths)).rstrip())
    return "\n".join(out)


# ============================================================================ figures
def png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def overlay(image: np.ndarray, mask: np.ndarray | None, scale: int = 1) -> np.ndarray:
    """Grayscale image as BGR with the mask outline in red, upscaled by ``scale`` (nearest)."""
    img = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if scale > 1:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    if mask is not None and mask.any():
        m = cv2.resize(mask.astype(np.uint8), img.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, (40, 40, 230), 1)
    return img


def tile(cells: Sequence[np.ndarray], cols: int, pad: int = 2) -> np.ndarray:
    h, w = cells[0].shape[:2]
    rows = (len(cells) + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k, c in enumerate(cells):
        r, q = divmod(k, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = c
    return out


def _scale(size: int) -> int:
    return max(1, 128 // size)


def sample_grid(images: np.ndarray, masks: np.ndarray, count: int = 8, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), min(count, len(images)), replace=False) if len(images) else []
    s = _scale(images.shape[-1])
    return png(tile([overlay(images[i], masks[i], s) for i in idx], cols=count))


def pairs_grid(left: np.ndarray, right: np.ndarray, left_masks=None, right_masks=None) -> bytes:
    """Rows of (left | right) pairs, e.g. synthetic image | its nearest training image."""
    s = _scale(left.shape[-1])
    cells = []
    for i in range(len(left)):
        cells.append(overlay(left[i], None if left_masks is None else left_masks[i], s))
        cells.append(overlay(right[i], None if right_masks is None else right_masks[i], s))
    return png(tile(cells, cols=2))


def _fig_png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def morphology_histograms(raw: dict[str, Any], label: str) -> bytes:
    plt = _plt()
    syn_t, syn_lab = raw["synthetic"]
    real_t, real_lab, real_held = raw["real"]
    s_sel, r_sel = syn_lab == label, (real_lab == label) & ~real_held
    fig, axes = plt.subplots(2, 4, figsize=(12, 5))
    for ax, name in zip(axes.ravel(), FEATURES):
        a, b = real_t[name][r_sel], syn_t[name][s_sel]
        both = np.concatenate([a, b])
        bins = np.linspace(both.min(), both.max() + 1e-9, 16) if len(both) else 10
        ax.hist(a, bins=bins, alpha=0.55, density=True, label=f"real train ({len(a)})")
        ax.hist(b, bins=bins, alpha=0.55, density=True, label=f"synthetic ({len(b)})")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"lesion morphology, class {label}")
    fig.tight_layout()
    return _fig_png(fig)


def distribution_plot(values: dict[str, np.ndarray], title: str, xlabel: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    both = np.concatenate([v for v in values.values() if len(v)])
    bins = np.linspace(both.min(), both.max() + 1e-9, 30)
    for name, v in values.items():
        ax.hist(v, bins=bins, alpha=0.55, density=True, label=f"{name} ({len(v)})")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)
    return _fig_png(fig)


def downstream_plot(comparison: dict[str, Any]) -> bytes:
    plt = _plt()
    names = [k for k, v in comparison.get("metrics", {}).items() if "mean_diff" in v and "skipped" not in v]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3 * max(1, len(names)), 2.6))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        v = comparison["metrics"][name]
        ax.errorbar([0], [v["mean_diff"]], yerr=[[v["mean_diff"] - v["ci_low"]], [v["ci_high"] - v["mean_diff"]]],
                    fmt="o", capsize=6)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks([])
        ax.set_title(f"{name}: combined - baseline", fontsize=9)
    return _fig_png(fig)


# ============================================================================ HTML
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}
th{background:#f2f2f2}.warn{color:#a15c00}.small{font-size:12px;color:#555}img{max-width:100%}
td.v-within{background:#e7f6e7}td.v-above,td.v-below{background:#fbe9e7}"""


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str], heads: Sequence[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in (heads or cols)) + "</tr>"]
    for r in rows:
        cells = []
        for c in cols:
            text = str(r.get(c, ""))
            cls = ""
            if c == "verdict":
                cls = ' class="v-within"' if text.startswith("within") else (
                    ' class="v-above"' if text.startswith(("above", "below")) else "")
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def render_html(metrics: dict[str, Any], figures: dict[str, Any]) -> str:
    """The report. ``figures``: {"samples": {label: (synthetic png, real png)}, "morphology": {label: png},
    "nearest_ssim": png, "closest": (png, rows), "downstream": png}."""
    e = html.escape
    inp = metrics.get("inputs", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Synthetic data evaluation</title>"
             f"<style>{_CSS}</style></head><body><h1>Synthetic data evaluation</h1>",
             f"<p class='small'>real: {e(str(inp.get('real_data')))} — synthetic: {e(str(inp.get('synthetic_data')))}"
             f" — {e(metrics.get('command', ''))}</p>",
             "<h2>Image quality beside the real-data floor</h2>",
             "<p class='small'>Each number compares the synthetic images with the real training images; the floor "
             "is the same number for held-out real images (val + test) at the same N — what a perfect generator "
             "would score. Synthetic sides are subsampled to that N (mean ± std over draws); floor spread from "
             "group-respecting re-splits of the real data. FID at small N is mostly bias: read it only beside its "
             "floor; KID is unbiased.</p>",
             _table(summary_rows(metrics), *QUALITY_COLUMNS)]
    outcomes = outcome_rows(metrics)
    if outcomes:
        parts += ["<h2>Privacy and downstream at a glance</h2>", _table(outcomes, *OUTCOME_COLUMNS)]
    weights = (metrics.get("generation") or {}).get("weights")
    if weights:
        parts.append(f"<p class='small'>Inception: {e(weights.get('name', ''))} (sha256 "
                     f"{e(str(weights.get('sha256'))[:16])}…) — {e(weights.get('note', ''))}</p>")
    warns = metrics.get("warnings", [])
    if warns:
        parts.append("<h3>Warnings</h3><ul>" + "".join(f"<li class='warn'>{e(w)}</li>" for w in warns) + "</ul>")
    if figures.get("samples"):
        parts.append("<h2>Samples per class</h2><p class='small'>image with the mask outline in red; first row "
                     "synthetic, second row real training images</p>")
        for lab, (syn_png, real_png) in figures["samples"].items():
            parts.append(f"<h3>{e(lab)}</h3>{_img(syn_png, f'synthetic {lab}')}<br>{_img(real_png, f'real {lab}')}")
    morph = metrics.get("morphology") or {}
    if morph.get("per_class"):
        parts.append("<h2>Tumour morphology</h2>")
        for lab, blk in morph["per_class"].items():
            if "skipped" in blk:
                parts.append(f"<p>{e(lab)}: {e(blk['skipped'])}</p>")
                continue
            rows = [{"feature": f, "synthetic mean": f"{v['synthetic_mean']:.3f}",
                     "real mean": f"{v['real_train_mean']:.3f}",
                     "W1/std": _pm(v["wasserstein"]["synthetic"], ".3f"),
                     "floor W1/std": _pm(v["wasserstein"]["floor"], ".3f"),
                     "KS": _pm(v["ks"]["synthetic"], ".3f"), "floor KS": _pm(v["ks"]["floor"], ".3f"),
                     "verdict": v["wasserstein"]["verdict"]} for f, v in blk["features"].items()]
            parts.append(f"<h3>{e(lab)} (synthetic {blk['n_synthetic']}, real train {blk['n_real_train']}, "
                         f"held-out {blk['n_heldout']} lesions)</h3>")
            parts.append(_table(rows, list(rows[0])))
            if lab in figures.get("morphology", {}):
                parts.append(_img(figures["morphology"][lab], f"morphology {lab}"))
    if figures.get("nearest_ssim"):
        parts.append("<h2>Nearest-real SSIM</h2>" + _img(figures["nearest_ssim"], "nearest SSIM"))
    mem = metrics.get("memorisation") or {}
    if mem and "skipped" not in mem:
        parts.append("<h2>Memorisation</h2>")
        held = mem.get("heldout_nearest_ncc", {})
        parts.append(f"<p>{mem['n_flagged']} of {mem['n_synthetic']} synthetic images reach NCC ≥ "
                     f"{mem['threshold']} with a training image ({e(mem['similarity'])}). Held-out real images' "
                     f"nearest-training NCC: median {held.get('median', float('nan')):.3f}, p99 "
                     f"{held.get('p99', float('nan')):.3f}, max {held.get('max', float('nan')):.3f} "
                     f"({mem.get('heldout_above_threshold', 0)} above the threshold) — the natural reference for "
                     "the threshold.</p>")
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
    elif mem:
        parts.append(f"<h2>Memorisation</h2><p>{e(mem['skipped'])}</p>")
    down = metrics.get("downstream")
    if down:
        parts.append("<h2>Downstream</h2>")
        for key, title in (("alignment", "Mask–image alignment"), ("comparison", "Baseline vs combined")):
            blk = down.get(key)
            if not blk:
                continue
            if "skipped" in blk:
                parts.append(f"<h3>{title}</h3><p>{e(blk['skipped'])}</p>")
            elif key == "alignment":
                rows = [{"class": k, "Dice": f"{v['mean']:.3f}", "N": v["n"],
                         "empty masks": f"{v['empty_mask_fraction']:.2f}",
                         "empty predictions": f"{v['empty_prediction_fraction']:.2f}"}
                        for k, v in blk["per_class"].items()]
                parts.append(f"<h3>{title}</h3><p class='small'>{e(blk['note'])}</p>" + _table(rows, list(rows[0])))
            else:
                rows = [{"metric": k, "baseline": f"{v['baseline']:.4f}", "combined": f"{v['combined']:.4f}",
                         "combined − baseline [95% CI]":
                             f"{v['mean_diff']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]",
                         "p": f"{v['p_value']:.3g}", "Holm p": "primary" if v.get("role") == "primary" else
                         f"{v.get('p_holm', float('nan')):.3g}", "N": v["n"]} for k, v in blk["metrics"].items()
                        if "skipped" not in v]
                parts.append(f"<h3>{title}</h3><p class='small'>{e(blk['note'])}</p>" + _table(rows, list(rows[0])))
        if figures.get("downstream"):
            parts.append(_img(figures["downstream"], "downstream"))
    parts.append("<p class='small'>All numbers are in metrics.json beside this file.</p></body></html>")
    return "\n".join(parts)


def build_figures(d: dict[str, Any], raw: dict[str, Any], metrics: dict[str, Any], per_class: int = 8
                  ) -> dict[str, Any]:
    """All figures of the report from the loaded sets (``d``, see evaluate.py) and the stages' raw arrays."""
    figs: dict[str, Any] = {"samples": {}, "morphology": {}}
    held = d["real_heldout"]
    train_i, train_m, train_l = d["real_images"][~held], d["real_masks"][~held], d["real_labels"][~held]
    for lab in sorted(set(d["syn_labels"])):
        s_sel, r_sel = d["syn_labels"] == lab, train_l == lab
        real_png = sample_grid(train_i[r_sel], train_m[r_sel], per_class) if r_sel.any() else b""
        figs["samples"][lab] = (sample_grid(d["syn_images"][s_sel], d["syn_masks"][s_sel], per_class), real_png)
    if "morphology" in raw:
        for lab, blk in (metrics.get("morphology") or {}).get("per_class", {}).items():
            if "skipped" not in blk:
                figs["morphology"][lab] = morphology_histograms(raw["morphology"], lab)
    sim = raw.get("similarity", {})
    if "nearest_syn" in sim:
        figs["nearest_ssim"] = distribution_plot({"synthetic": sim["nearest_syn"], "held-out real": sim["nearest_held"]},
                                                 "highest SSIM against the real training images", "SSIM")
    mem = raw.get("memorisation")
    if mem is not None:
        rows = (metrics.get("memorisation") or {}).get("closest", [])
        order = mem["order"][:len(rows)]
        if len(order):
            figs["closest"] = (pairs_grid(d["syn_images"][order], train_i[mem["syn_idx"][order]],
                                          d["syn_masks"][order], train_m[mem["syn_idx"][order]]),
                               [{**r, "ncc": f"{r['ncc']:.4f}"} for r in rows])
    comp = ((metrics.get("downstream") or {}).get("comparison") or {})
    if comp.get("metrics"):
        figs["downstream"] = downstream_plot(comp)
    return figs
