"""Phase 2: draw synthetic ultrasound image + tumour mask pairs from a trained checkpoint into a pair dataset.

Every pair has its own seed (seed + 1000003 x class index + candidate index), so the same flags give
byte-identical PNGs whatever --batch_size or the number of processes: tested on the CPU, where the
denoiser always runs on fixed 16-row chunks; on GPUs expected but untested.
A tumour-class sample whose mask is empty once components smaller than --min_lesion_area are removed
(or a 'normal' sample with a lesion) is rejected and the next candidate takes its place; the dataset
holds the first N accepted candidates per class. Rerunning the same command resumes: finished pairs are
kept, rejected candidates are not redrawn; a larger count adds pairs. The output folder is a pair
dataset (split train, source synthetic, provenance per pair in metadata.csv) with generation.json (the
run's settings), rejected.jsonl and preview.png.

Controlled generation (--condition_masks): the mask channel is held fixed at given masks while sampling, so
the same checkpoint draws images for chosen lesion shapes, sizes and positions (sampling/conditioned.py).
--segmenter RUN reports how well the generated images honour their masks (alignment.json).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import make_parser, parse_config, positive_int, print_config, run_main
from common.options import bounded
from common.errors import UserError
from sampling.generation import (DEFAULT_GUIDANCE, DEFAULT_MAX_CANDIDATES_PER_SAMPLE, DEFAULT_MIN_LESION_AREA,
                            DEFAULT_SAMPLER)

DEFAULT_COUNT = 1000
EPILOG = """examples:
  # the plan's command (1000 pairs per class from the model train_medsegdiff.py wrote)
  python generate_synthetic.py --checkpoint_path ./checkpoints/best_model.pth --num_samples_per_class 1000 --output_dir ./synthetic_busi
  # interrupted? run the same command again: finished pairs are kept, only the missing ones are drawn
  # as many of each class as make the training split of the real data 50/50 benign/malignant
  python generate_synthetic.py --balance_to ./data/busi_processed --output_dir ./synthetic_balanced
  # ... and a balanced training split of 2000 pairs in all (real + synthetic)
  python generate_synthetic.py --balance_to ./data/busi_processed --total 2000 --output_dir ./synthetic_2000
  # the 1000-step sampler of the published code, and DDIM at 50 steps with stronger guidance
  python generate_synthetic.py --sampler ddpm --output_dir ./synthetic_ddpm
  python generate_synthetic.py --sampler ddim --steps 50 --guidance_scale 2.0 --output_dir ./synthetic_ddim
  # several processes (GPUs, or gloo on the CPU): candidates are dealt out; the same pairs as one process
  torchrun --nproc_per_node 4 generate_synthetic.py --num_samples_per_class 1000 --output_dir ./synthetic_busi
  # print the resolved settings (and the per-class counts) without drawing anything
  python generate_synthetic.py --balance_to ./data/busi_processed --dry-run
  # controlled generation: one image per training mask of the real data, for masks made larger and moved near
  # the skin; then how well the images honour the masks, judged by a segmenter trained on real data
  python generate_synthetic.py --condition_masks ./data/busi_processed --classes malignant \
      --mask_transform scale=1.3:1.6,place=0.15:0.35 --output_dir ./synthetic_large_superficial \
      --segmenter checkpoints/segmentation/madgnet_busi_processed_seed0
"""


def build_parser() -> argparse.ArgumentParser:
    from models.diffusion import DEFAULT_STEPS, SAMPLERS
    p = make_parser(__doc__, EPILOG)
    g = p.add_argument_group("what to generate")
    g.add_argument("--checkpoint_path", default="./checkpoints/best_model.pth",
                   help="diffusion checkpoint written by train_medsegdiff.py (best_model.pth or last.pth), or a "
                        "folder export_model.py wrote from one (the same pairs); it carries the model, its classes "
                        "and image size")
    g.add_argument("--output_dir", default="./synthetic_busi",
                   help="output pair dataset; an existing folder of the same run is resumed/extended, any other "
                        "non-empty folder is refused")
    g.add_argument("--num_samples_per_class", type=bounded(int, 1, 10**7), default=None,
                   help=f"pairs to generate per class (default {DEFAULT_COUNT}%(default).0s; not with --balance_to)")
    g.add_argument("--classes", default="benign,malignant",
                   help="comma-separated classes to generate; each must be one the checkpoint was trained on "
                        "(benign, malignant, and normal for a 3-class model)")
    g.add_argument("--balance_to", default=None, metavar="DATASET",
                   help="instead of a fixed count: generate as many of each class as make the training split "
                        "of this pair dataset 50/50 benign/malignant (the minority class is topped up)")
    g.add_argument("--total", type=positive_int, default=None,
                   help="with --balance_to: size of the balanced training split, real + synthetic "
                        "(total/2 per class; must be even and at least twice the larger real class)"
                        "%(default).0s")
    g.add_argument("--min_lesion_area", type=bounded(int, 0, 10**6), default=DEFAULT_MIN_LESION_AREA,
                   help="mask components smaller than this many pixels (at the checkpoint's image size) are "
                        "removed; a tumour sample left with an empty mask is rejected and replaced")
    g.add_argument("--max_candidates_per_sample", type=bounded(int, 1, 10**4), default=DEFAULT_MAX_CANDIDATES_PER_SAMPLE,
                   help="give up on a class after this many candidates per requested pair (i.e. when rejections "
                        "are that frequent)")
    g = p.add_argument_group("controlled generation (mask-conditioned)")
    g.add_argument("--condition_masks", default=None, metavar="SOURCE",
                   help="draw images for given masks: a pair dataset (the masks of its training split) or a folder of "
                        "mask PNGs; the mask channel is held fixed while sampling and reproduced exactly. Without "
                        "--num_samples_per_class: one pair per condition mask")
    g.add_argument("--mask_transform", default=None, metavar="SPEC",
                   help="new masks from the given ones, drawn per sample: comma list of scale=A:B, rotate=DEG, "
                        "elastic=PX, shift=F, place=Y0:Y1 (lesion centroid depth as a fraction of the height), "
                        "flip=P; e.g. scale=1.3:1.6,place=0.15:0.35")
    g.add_argument("--condition_labels", default="same", choices=("same", "any"),
                   help="with a labelled --condition_masks: each class uses the masks of its own label, or all")
    g.add_argument("--segmenter", default=None, metavar="RUN",
                   help="a train_segmentation.py run: report mask-image alignment (Dice between each written mask "
                        "and the segmenter's prediction on its image) in alignment.json")
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS,
                   help="diffusers scheduler: ddpm (ancestral, slow), ddim (deterministic), dpmsolver++ "
                        "(2nd-order multistep, fastest for its quality)")
    g.add_argument("--steps", type=bounded(int, 0, 10**5), default=0,
                   help="denoising steps; 0 = the sampler's default ("
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    g.add_argument("--guidance_scale", type=bounded(float, 0, 100), default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance: 1 = none; larger = more class-typical, less diverse")
    g.add_argument("--seed", type=bounded(int, 0, 2**31 - 1), default=0,
                   help="base seed; pair j of class c uses seed + 1000003*c + j")
    g = p.add_argument_group("hardware")
    g.add_argument("--batch_size", type=bounded(int, 1, 4096), default=16,
                   help="samples drawn together per process (speed and memory only: the output does not "
                        "change). On the CPU the denoiser always runs on 16 rows (a sample is 2 rows with "
                        "guidance), so values below 8 save no time there")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: the local GPU)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto = bf16 on GPUs that support it, else fp32; the CPU always samples in fp32. Part of "
                        "the run's identity: resuming with another precision is refused")
    return p


def main(argv=None, *, after_batch=None) -> int:
    from sampling.generation import GenerationRequest, format_summary
    from sampling.plan import resolve_classes, resolve_counts
    from models.diffusion import DEFAULT_STEPS
    args = parse_config(build_parser(), argv)
    classes = resolve_classes(args.classes)
    if args.mask_transform and not args.condition_masks:
        raise UserError("--mask_transform changes condition masks: give --condition_masks as well")
    if args.condition_masks and args.num_samples_per_class is None and not args.balance_to:
        counts = None   # one pair per condition mask, counted once the masks are read
    else:
        counts = resolve_counts(classes, args.num_samples_per_class, args.balance_to, args.total, DEFAULT_COUNT)
    if args.mask_transform:
        from sampling.conditioned import MaskTransform
        MaskTransform.parse(args.mask_transform)   # a bad spec fails before the checkpoint is read
    if args.dry_run:
        print_config(args)
        what = "one pair per condition mask" if counts is None else f"counts {counts}"
        print(f"resolved: {what}, {args.sampler} with {args.steps or DEFAULT_STEPS[args.sampler]} steps")
        return 0
    req = GenerationRequest(
        checkpoint_path=args.checkpoint_path, output_dir=args.output_dir, classes=classes, counts=counts,
        sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
        seed=args.seed, min_lesion_area=args.min_lesion_area,
        max_candidates_per_sample=args.max_candidates_per_sample, device=args.device, precision=args.precision,
        command=args.command,
        extra={k: v for k, v in (("balance_to", args.balance_to), ("total", args.total)) if v is not None},
        condition_masks=args.condition_masks, mask_transform=args.mask_transform,
        condition_labels=args.condition_labels)
    if args.segmenter and not (Path(args.segmenter) / "best_model.pth").is_file():
        raise UserError(f"--segmenter {args.segmenter}: no best_model.pth (pass a train_segmentation.py run folder)")
    from sampling.generation import generate
    summary = generate(req, after_batch=after_batch)
    if "per_class" in summary:   # rank 0
        print(format_summary(summary))
        if args.segmenter:
            print(report_alignment(args.output_dir, args.segmenter, args.device))
    return 0


def report_alignment(output_dir: str, run: str, device: str) -> str:
    """alignment.json: how well the generated images honour their masks, judged by a real-data segmenter."""
    from common.io import atomic_write_json
    from data.pairs import open_pair_dataset
    from metrics.similarity import mask_alignment, predict_masks
    from models.loading import load_segmenter
    from common.precision import resolve_device
    ds = open_pair_dataset(output_dir)
    images, masks = ds.load()
    model, size = load_segmenter(run)
    dev = str(resolve_device(device))
    res = mask_alignment(masks, predict_masks(model, images, size, device=dev), [r["label"] for r in ds.rows])
    res["segmenter"] = str(Path(run).resolve())
    atomic_write_json(Path(output_dir) / "alignment.json", res)
    per = ", ".join(f"{k} {v['mean']:.3f}" for k, v in res["per_class"].items())
    return (f"mask-image alignment (Dice of each mask with the segmenter's prediction on its image): "
            f"{res['all']['mean']:.3f} over {res['all']['n']} pairs ({per}); {Path(output_dir) / 'alignment.json'}")


if __name__ == "__main__":
    run_main(main)
