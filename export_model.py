#!/usr/bin/env python
"""Export a trained joint diffusion checkpoint (.pth from train_medsegdiff.py) as a diffusers pipeline folder:
safetensors weights, the model and scheduler configs, model_index.json and a model card (README.md), loadable with
diffusers' from_pretrained through busdiff's JointImageMaskPipeline (models/hub.py) and by generate_synthetic.py
--checkpoint_path. The folder is built in a hidden staging folder and renamed into place when complete, so an
interrupted export never leaves a folder that looks finished. --push_to_hub uploads it (only when asked)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.cli import make_parser, parse_config, run_main
from common.errors import UserError

EPILOG = """examples:
  python export_model.py --checkpoint_path ./checkpoints/best_model.pth --output_dir ./exports/busi256
  # the image quality from evaluate.py on the model card (its samples must come from this checkpoint)
  python export_model.py --checkpoint_path ./checkpoints/best_model.pth --metrics ./results/evaluation/metrics.json \\
      --output_dir ./exports/busi256
  # check the inputs and print what would be written
  python export_model.py --checkpoint_path ./checkpoints/best_model.pth --dry-run
  # share it on the Hugging Face Hub (log in first: huggingface-cli login)
  python export_model.py --checkpoint_path ./checkpoints/best_model.pth --output_dir ./exports/busi256 \\
      --push_to_hub --hub_model_id you/busdiff-busi256 --private
then, from Python (in a busdiff checkout):
  from models.hub import JointImageMaskPipeline
  pipe = JointImageMaskPipeline.from_pretrained("./exports/busi256")
  out = pipe(class_labels="malignant", num_per_class=4)   # out.images uint8, out.masks bool, [4, H, W]
"""


def build_parser() -> argparse.ArgumentParser:
    from models.diffusion import SAMPLERS
    p = make_parser(__doc__, EPILOG)
    p.add_argument("--checkpoint_path", default="./checkpoints/best_model.pth",
                   help="diffusion checkpoint written by train_medsegdiff.py (best_model.pth, last.pth or a snapshot); "
                        "its EMA weights are exported")
    p.add_argument("--output_dir", default="./exports/busdiff_model",
                   help="the folder to write; must not exist or be empty (see --overwrite)")
    p.add_argument("--sampler", default="dpmsolver++", choices=SAMPLERS,
                   help="the scheduler saved with the pipeline (its default sampler; users may swap it): ddpm, ddim "
                        "(EDM models: Euler) or dpmsolver++")
    p.add_argument("--metrics", default=None, metavar="METRICS_JSON",
                   help="evaluate.py's metrics.json for samples of this checkpoint: KID/FID beside the real-vs-real "
                        "floor go on the model card")
    p.add_argument("--dataset_license", default=None, metavar="FILE",
                   help="the training data's licence notice, copied beside the card (BUS-BRA requires its notice in "
                        "every copy); default: the LICENSE.txt of the raw dataset the training data was prepared from, "
                        "when it is still there")
    p.add_argument("--title", default=None, help="title of the model card (default: the output folder's name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export in --output_dir (only a folder this script wrote is replaced)")
    p.add_argument("--push_to_hub", action="store_true",
                   help="after writing the folder, upload it to the Hugging Face Hub (needs huggingface-cli login or "
                        "HF_TOKEN); nothing is uploaded without this flag")
    p.add_argument("--hub_model_id", default=None, metavar="OWNER/NAME",
                   help="with --push_to_hub: the model repository (default: the output folder's name in your namespace)")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: create the repository as private")
    return p


def read_checkpoint(path: str):
    from common.checkpoint import load_checkpoint
    from models.hub import is_export
    if Path(path).is_dir():
        what = "is already an exported folder" if is_export(path) else "is a folder, not a .pth checkpoint"
        raise UserError(f"{path}: {what}; --checkpoint_path takes a checkpoint written by train_medsegdiff.py")
    return load_checkpoint(path, expect_kind="diffusion")


def read_metrics(path: str) -> dict:
    if not Path(path).is_file():
        raise UserError(f"{path}: --metrics file not found")
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable as JSON ({type(exc).__name__})") from None
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: not evaluate.py's metrics.json (not a JSON object)")
    return metrics


def main(argv=None) -> int:
    from common.io import sha256_file
    from metrics.model_card import (LICENSE_NOTICE, describe_training_data, metrics_provenance, quality_rows,
                                    render_card)
    from models.hub import check_export_target, pipeline_from_checkpoint, save_export
    args = parse_config(build_parser(), argv)
    if (args.hub_model_id or args.private) and not args.push_to_hub:
        raise UserError("--hub_model_id and --private go with --push_to_hub")
    ckpt = read_checkpoint(args.checkpoint_path)
    sha = sha256_file(args.checkpoint_path)
    out = check_export_target(args.output_dir, args.overwrite)
    try:
        pipe = pipeline_from_checkpoint(ckpt, args.sampler)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{args.checkpoint_path}: cannot be exported ({str(exc).splitlines()[0][:200]})") from None
    data = describe_training_data((ckpt.get("config") or {}).get("data_dir"))
    quality = note = headline = None
    if args.metrics:
        metrics = read_metrics(args.metrics)
        quality = quality_rows(metrics, args.metrics)
        note = metrics_provenance(metrics, sha, args.metrics)
        headline = (metrics.get("generation") or {}).get("headline_reason")
    if args.dataset_license and not Path(args.dataset_license).is_file():
        raise UserError(f"{args.dataset_license}: --dataset_license file not found")
    notice_src = args.dataset_license or data["license_file"]
    needs_notice = [d for d in data["datasets"] if d in LICENSE_NOTICE] if not data["phantom"] else []
    notice_name = LICENSE_NOTICE[needs_notice[0]] if needs_notice else "DATASET_LICENSE.txt"
    if args.push_to_hub and needs_notice and not notice_src:
        raise UserError(f"--push_to_hub: the model was trained on {needs_notice[0]}, whose licence requires its "
                        "notice in every copy; give its LICENSE.txt with --dataset_license")
    n_params = sum(p.numel() for p in pipe.denoiser.parameters())
    if args.dry_run:
        print(f"would export {args.checkpoint_path} (step {ckpt.get('step', '?')}, {ckpt['model_class']}, "
              f"{n_params / 1e6:.2f} M parameters, classes {', '.join(ckpt['class_names'])}) to {out} with the "
              f"{args.sampler} scheduler; training data: {', '.join(data['datasets']) or 'not found'}"
              f"{'; metrics: ' + args.metrics if args.metrics else ''}"
              f"{'; then push to the Hub' if args.push_to_hub else ''}")
        return 0
    repo_id = None
    if args.push_to_hub:   # the repository first: the card names its real id
        repo_id = hub_call(lambda api: api.create_repo(args.hub_model_id or out.name, private=args.private,
                                                       exist_ok=True).repo_id)
    card = render_card(args.title or out.name, ckpt, data, n_params, args.sampler, quality, note,
                       notice_name if notice_src else None, str(out), repo_id, headline)
    info = {"source_checkpoint": str(Path(args.checkpoint_path).resolve()), "source_sha256": sha,
            "step": ckpt.get("step"), "epoch": ckpt.get("epoch"), "best_val_loss": ckpt.get("best_val_loss"),
            "train_cpu_s": ckpt.get("train_cpu_s"), "train_wall_s": ckpt.get("train_wall_s"),
            "sampler": args.sampler, "training_data": data, "metrics": args.metrics, "config": ckpt.get("config"),
            "command": args.command}
    save_export(pipe, out, info, card, {notice_name: notice_src} if notice_src else None, args.overwrite)
    print(f"exported {args.checkpoint_path} (step {ckpt.get('step', '?')}) to {out}: "
          f"{', '.join(sorted(p.name for p in out.iterdir()))}")
    if not notice_src and (needs_notice or not data["found"]):
        print("note: no dataset licence notice copied; if the data was BUS-BRA, add its LICENSE.txt before sharing")
    if repo_id:
        hub_call(lambda api: api.upload_folder(repo_id=repo_id, folder_path=str(out),
                                               commit_message=f"busdiff export of {Path(args.checkpoint_path).name}"))
        print(f"pushed to https://huggingface.co/{repo_id}")
    return 0


def hub_call(fn):
    """One Hugging Face Hub call; any failure (no login, no network, no permission) is one error line."""
    from huggingface_hub import HfApi
    try:
        return fn(HfApi())
    except Exception as exc:   # the Hub client raises many types; all mean the same thing here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--push_to_hub: {first[:200]}") from None


if __name__ == "__main__":
    run_main(main)
