"""The model card (README.md) of an exported model folder (export_model.py): what the model draws, the data it was
trained on, how long, its image quality beside the real-vs-real floor when an evaluate.py metrics.json is given, how
to use it, and the terms: research use only, never clinical use, and the training data's licence caveats."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import UserError

# what each source dataset's terms ask of anyone sharing a model trained on it
DATA_TERMS = {
    "BUSI": ("W. Al-Dhabyani, M. Gomaa, H. Khaled, A. Fahmy, \"Dataset of breast ultrasound images\", *Data in "
             "Brief* 28 (2020) 104863. **Its redistribution terms are unclear**: whether weights trained on it may be "
             "shared, and under which terms, is not stated; check with its authors before sharing this model beyond "
             "your own research."),
    "BUS-BRA": ("W. Gómez-Flores, M. J. Gregorio-Calas, W. C. A. Pereira, \"BUS-BRA: A breast ultrasound dataset for "
                "assessing computer-aided diagnosis systems\", *Medical Physics* 51 (2024) 3110-3123 (Zenodo "
                "10.5281/zenodo.8231412). **Its licence requires** every work that uses the dataset to cite this "
                "article, and its copyright and permission notice to be kept in all copies or substantial portions."),
    "UDIAT": ("M. H. Yap et al., \"Automated breast ultrasound lesions detection using convolutional neural "
              "networks\", *IEEE J. Biomed. Health Inform.* 22 (2018) 1218-1226. Distributed by its authors on "
              "request: the terms you obtained it under apply to sharing this model."),
}
LICENSE_NOTICE = {"BUS-BRA": "BUSBRA_LICENSE.txt"}   # the notice file a model trained on it must carry


def describe_training_data(data_dir: str | None) -> dict[str, Any]:
    """What the checkpoint's --data_dir held, if it is still there: source datasets (from each pair's provenance),
    whether it is the simulated phantom, training counts per class, and the source's licence file if found."""
    facts: dict[str, Any] = {"path": data_dir, "found": False, "datasets": [], "phantom": False, "counts": {},
                             "license_file": None}
    if not data_dir or not (Path(data_dir) / "dataset.json").is_file():
        return facts
    from data.pairs import open_pair_dataset
    try:
        ds = open_pair_dataset(data_dir, check_files=False)
    except UserError:   # changed since training: described as not found rather than blocking the export
        return facts
    train = [r for r in ds.rows if r["split"] == "train"]
    facts.update(found=True, phantom=bool(ds.info.get("phantom")),
                 datasets=sorted({r.get("dataset", "") for r in train if r.get("dataset")}),
                 counts={lab: sum(r["label"] == lab for r in train) for lab in sorted({r["label"] for r in train})},
                 synthetic_in_train=sum(r["source"] == "synthetic" for r in train))
    source_dir = ds.info.get("dataset_dir")
    if source_dir and Path(source_dir).is_dir():
        found = [p for p in Path(source_dir).iterdir() if p.name.lower() in ("license.txt", "licence.txt")]
        facts["license_file"] = str(found[0]) if found else None
    return facts


def quality_rows(metrics: dict[str, Any], source: str) -> list[dict[str, str]]:
    """KID and FID (all pairs, then per class) beside their real-vs-real floor, from evaluate.py's metrics.json;
    verdicts read as the report reads them (lower is better: "worse than floor", not "above floor")."""
    from metrics.report import directed_verdict
    try:
        gen = metrics["generation"]
        sets = [("all", gen["all"])] + sorted(gen.get("per_class", {}).items())
        rows = []
        for name, block in sets:
            for key, label in (("kid", "KID"), ("fid", "FID")):
                m = block.get(key)
                if not isinstance(m, dict) or "floor" not in m:
                    continue
                fmt = "{:.4f}" if key == "kid" else "{:.2f}"
                syn, floor = m["synthetic"], m["floor"]
                rows.append({"metric": label + ("" if name == "all" else f" ({name})"),
                             "synthetic": fmt.format(syn["mean"]),
                             "floor": f"{fmt.format(floor['mean'])} ± {fmt.format(floor['std'])}",
                             "n": str(m.get("n", block.get("n", ""))),
                             "verdict": directed_verdict(str(m.get("verdict", "")), "lower")[0]})
    except (KeyError, TypeError, AttributeError):
        rows = []
    if not rows:
        raise UserError(f"{source}: no KID/FID beside a floor in it (expected evaluate.py's metrics.json, with "
                        "generation.all.kid / fid)")
    return rows


def metrics_provenance(metrics: dict[str, Any], checkpoint_sha256: str, source: str) -> str:
    """Which samples the metrics were computed on, and whether they came from this checkpoint: a definite
    mismatch is refused (the card would credit this model with another model's quality)."""
    syn = (metrics.get("inputs") or {}).get("synthetic_data")
    run_file = Path(syn) / "generation.json" if syn else None
    if run_file is None or not run_file.is_file():
        return f"computed on `{syn or 'unknown samples'}` (not checked against this checkpoint: folder not found)"
    try:
        drawn_from = json.loads(run_file.read_text())["identity"]["checkpoint_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"computed on `{syn}` (its generation.json is unreadable: not checked against this checkpoint)"
    if drawn_from != checkpoint_sha256:
        raise UserError(f"{source}: its synthetic data {syn} was drawn from another checkpoint (sha256 "
                        f"{drawn_from[:12]}..., this one is {checkpoint_sha256[:12]}...); give this model's metrics")
    return f"computed on `{syn}`, drawn from this checkpoint (sha256 checked)"


def render_card(title: str, ckpt: dict[str, Any], data: dict[str, Any], n_params: int, sampler: str,
                quality: list[dict[str, str]] | None, quality_note: str | None, notice_file: str | None,
                folder: str, repo_id: str | None = None, headline: str | None = None) -> str:
    """README.md of an export: front matter for the Hub, then model, data, quality, use and terms."""
    cfg = ckpt.get("config") or {}
    names = list(ckpt["class_names"])
    diff = ckpt["diffusion"]
    datasets = ["simulated phantom"] if data["phantom"] else (data["datasets"] or ["unknown"])
    tags = ["diffusers", "medical-imaging", "breast-ultrasound", "segmentation", "synthetic-data", "research-only"]
    lines = ["---", "library_name: diffusers", "license: other", "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {title}", "",
             "> **Research use only. Not for clinical use**: not a medical device, not validated for diagnosis, "
             "screening or treatment decisions. Synthetic images must never be presented as patient data.", "",
             f"A class-conditioned diffusion model that draws a {ckpt['img_size']} x {ckpt['img_size']} "
             f"breast-ultrasound image **and its tumour mask together** (classes: {', '.join(names)}), made with "
             "busdiff to test whether synthetic pairs help a segmenter.", "",
             "## Model", "",
             f"- network: {ckpt['model_class']}, {n_params / 1e6:.2f} M parameters (EMA weights, fp32 safetensors)",
             f"- noise process: {diff['parameterization']} parameterisation, prediction {diff['prediction_type']}, "
             f"mask channel {diff['mask_encoding']}{', self-conditioning' if diff.get('self_condition') else ''}",
             f"- scheduler in this folder: {sampler} (any sampler the noise process supports can be swapped in)",
             f"- classifier-free guidance: null class = index {len(names)}", "",
             "## Training data", "",
             f"- data: {', '.join(datasets)} (pair dataset `{data['path']}`)"]
    if data["found"]:
        counts = ", ".join(f"{k} {v}" for k, v in data["counts"].items())
        lines.append(f"- training split: {counts}" + (f" ({data['synthetic_in_train']} of them synthetic)"
                                                      if data.get("synthetic_in_train") else ""))
    else:
        lines.append("- the data folder was not found at export time: state the data and its terms here before "
                     "sharing")
    epochs = ckpt.get("epoch")
    lines += [f"- training: {ckpt.get('step', '?')} steps" + (f" ({epochs} epochs)" if epochs not in (None, -1) else "")
              + f", batch {cfg.get('batch_size', '?')}, learning rate {cfg.get('lr', '?')}, EMA decay "
              f"{cfg.get('ema_decay', '?')}, {cfg.get('resolved_precision') or cfg.get('precision', '?')} on "
              f"{cfg.get('device_resolved') or cfg.get('device', '?')}",
              f"- command: `{cfg.get('command', 'unknown')}`", "", "## Image quality", ""]
    if quality:
        lines += ["Each number beside its floor: the same metric between real training images and held-out real "
                  "images at the same N (lower is better for both; the floor is what real data itself scores).", "",
                  "| metric | synthetic | real-vs-real floor | N | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {r['metric']} | {r['synthetic']} | {r['floor']} | {r['n']} | {r['verdict']} |" for r in quality]
        lines += ["", f"Metrics {quality_note}." + (f" {headline}." if headline else "")]
    else:
        lines.append("Not evaluated at export: run `evaluate.py` on samples of this model and export again with "
                     "`--metrics`.")
    load = (["from huggingface_hub import snapshot_download", "pipe = JointImageMaskPipeline.from_pretrained("
             f"snapshot_download({repo_id!r}))"] if repo_id else
            [f"pipe = JointImageMaskPipeline.from_pretrained({folder!r})"])
    lines += ["", "## Use", "", "The network and its noise process are busdiff's code: run from a busdiff checkout or "
              "put it on `PYTHONPATH`.", "", "```python", "import torch",
              "from models.hub import JointImageMaskPipeline", *load,
              f"out = pipe(class_labels={names[-1]!r}, num_per_class=4, generator=torch.Generator().manual_seed(0))",
              "out.images, out.masks   # uint8 [4, H, W], bool [4, H, W]", "```", "",
              "Or through busdiff's generator (rejection of empty masks, resumable, provenance per pair): "
              "`python generate_synthetic.py --checkpoint_path <this folder> ...`.", "",
              "## Licence and data terms", "",
              "The weights are derived from the training data; its terms come with them:", ""]
    lines += terms_lines(datasets, data["phantom"], notice_file)
    lines += ["", "Research use, not for clinical use."]
    return "\n".join(lines) + "\n"


def terms_lines(datasets: list[str], phantom: bool, notice_file: str | None) -> list[str]:
    """The data-terms bullets: each known source's terms; both BUSI's and BUS-BRA's when the source is unknown."""
    if phantom:
        return ["- simulated phantom (busdiff's simulator): no patient data and no dataset terms."]
    known = [d for d in datasets if d in DATA_TERMS]
    unknown = not known or len(known) < len(datasets)
    shown = known + [d for d in ("BUSI", "BUS-BRA") if unknown and d not in known]
    out = [("- " if d in known else "- if trained on ") + f"{d}: {DATA_TERMS[d]}" for d in shown]
    if "BUS-BRA" in shown:
        where = (f"kept in `{notice_file}` beside this card" if notice_file else
                 "not found at export: add the dataset's LICENSE.txt beside this card before sharing")
        out.append(f"- BUS-BRA copyright and permission notice: {where}.")
    return out
