"""bench/quality.py's vocabulary: the recipes (named changes to a baseline), the loop settings every recipe
trains under, the work folder's layout (Setup) and the sampler specs. Shared by the phases and the report."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.errors import UserError  # noqa: E402

PRESET = "configs/busbra_evidence.yaml"
# every recipe trains under the same loop settings: a constant learning rate (the budget, not a step count, ends a
# run), validation only at the end, no sample grids, last.pth every 200 steps, two more EMA lengths; the budget's
# clock (CPU minutes on the CPU, wall minutes on a GPU) is added by Setup.bench_flags.
# The EMA warm-up caps every decay at (1 + n) / (10 + n) after n steps, so a decay d only takes effect after
# 9 / (1 - d) - 10 steps: 890 for 0.99, 1790 for 0.995, 8990 for the preset's 0.999. Decays above the cap at the
# benchmark's step counts (0.998 and 0.9995 were tried first) give weights identical to the preset's, so the extra
# lengths are the shorter ones that bind within a 30-minute budget.
BENCH_FLAGS = ["--lr_scheduler", "constant_with_warmup", "--max_steps", "10000000", "--sample_every", "0",
               "--val_every", "10000000", "--save_every", "200", "--log_every", "50",
               "--extra_ema_decays", "0.99,0.995"]
# the preset's EMA first; then extra_ema_decays, then the power-function EMAs that current_seed3 tracks, named as
# the trainer keys them in a snapshot's extra_emas (f"{decay:g}", f"std{width:g}")
POWER_EMA_STDS = (0.05, 0.15, 0.25)
POWER_EMA_STDS_FLAG = ",".join(f"{w:g}" for w in POWER_EMA_STDS)   # --extra_ema_stds as the recipe passes it
EMA_VARIANTS = ("0.999", "0.99", "0.995", *(f"std{w:g}" for w in POWER_EMA_STDS))
PEER_CHANNELS = "24,48,48,96"                 # diffusers UNet2DModel at the preset's FLOPs per step (87.5 vs 89.5 G)


@dataclass
class Recipe:
    what: str
    flags: list[str] = field(default_factory=list)
    repeats: str = ""    # another recipe this one repeats at a different training seed (the report's seed spread)
    # the learning rate decays over the whole budget: a snapshot at a smaller budget is mid-decay, not what a run
    # of that length would give, so the recipe trains to the largest budget and is a point there only
    decays_to_budget: bool = False


# The recipes are changes to the preset as it stood when the benchmark ran (lr 5e-4, the binary mask); every recipe
# starts from that baseline explicitly, so the committed results stay reproducible whatever the preset becomes (it
# has since taken the signed-distance mask). The peer was trained at the baseline's lr too: it had no
# learning-rate sweep of its own.
BASELINE_FLAGS = ["--lr", "5e-4", "--mask_encoding", "binary"]
RECIPES: dict[str, Recipe] = {
    "current": Recipe("configs/busbra_evidence.yaml before this benchmark: MedSegDiffV2 11.3M, patch 2, "
                      "v-prediction + Min-SNR-5, transformer at the 4x4 bottleneck, lr 5e-4, batch 16"),
    "current_seed1": Recipe("the baseline again with training seed 1 (initialisation, data order, noise): how far "
                            "KID moves between seeds, the yardstick for every recipe's difference", ["--seed", "1"],
                            repeats="current"),
    "current_seed2": Recipe("the baseline again with training seed 2: a third seed for the yardstick",
                            ["--seed", "2"], repeats="current"),
    "current_seed3": Recipe("the baseline again with training seed 3, tracking power-function EMAs (EDM2) of "
                            f"relative widths {POWER_EMA_STDS_FLAG} beside the preset's: a "
                            "fourth seed, and EMA "
                            "lengths compared on one trajectory (the preset's warm-up EMA is itself close to a power "
                            "EMA of width ~0.09 at these step counts)",
                            ["--seed", "3", "--extra_ema_stds", POWER_EMA_STDS_FLAG],
                            repeats="current"),
    "current_seed4": Recipe("the baseline again with training seed 4: trained side by side with `small` in one "
                            "sitting, its same-load yardstick", ["--seed", "4"], repeats="current"),
    "small": Recipe("a quarter of the FLOPs per step: width 24 (24-48-48-96 at patch 2, ~2.8M parameters), so "
                    "more steps in the same minutes; which model size a CPU-hour favours",
                    ["--model_channels", "24", "--seed", "4"]),
    "current_seed5": Recipe("the baseline again with training seed 5: trained side by side with `small_seed5`, the "
                            "model-size pair's second replicate", ["--seed", "5"], repeats="current"),
    "small_seed5": Recipe("`small` again with training seed 5: whether its difference from the baseline holds at "
                          "another seed", ["--model_channels", "24", "--seed", "5"], repeats="small"),
    "tiny": Recipe("a ninth of the FLOPs per step: width 16 (16-32-32-64 at patch 2, ~1.3M parameters); the next "
                   "point on the model-size axis below `small`", ["--model_channels", "16", "--seed", "4"]),
    "lr_cosine": Recipe("the preset's own schedule: cosine decay of the learning rate to zero at the end of the budget "
                        "(every other recipe keeps a constant rate after warm-up, as a run ended by time had to); "
                        "seed 4, against `current_seed4`",
                        ["--lr_scheduler", "cosine", "--seed", "4"], decays_to_budget=True),
    "lr_wsd": Recipe("warm-up-stable-decay: the constant rate, then a linear decay to zero over the budget's last "
                     "quarter (Hägele et al. 2024); seed 4, identical to `current_seed4` until the decay starts",
                     ["--lr_scheduler", "warmup_stable_decay", "--lr_decay_fraction", "0.25", "--seed", "4"],
                     decays_to_budget=True),
    "lr_cosine_seed5": Recipe("`lr_cosine` again with training seed 5, against `current_seed5` (the constant rate): "
                              "whether the decay's lead holds at a second seed",
                              ["--lr_scheduler", "cosine", "--seed", "5"], repeats="lr_cosine", decays_to_budget=True),
    "small_cosine_seed5": Recipe("the two 60-minute leaders together: width 24 (`small`) with cosine decay to zero at "
                                 "the budget's end (`lr_cosine`), seed 5; against `lr_cosine_seed5` and `small_seed5`",
                                 ["--model_channels", "24", "--lr_scheduler", "cosine", "--seed", "5"],
                                 decays_to_budget=True),
    # the same two at twice the budget: a decaying run is one point at its own budget, so they need runs of their own
    "lr_cosine120_seed5": Recipe("`lr_cosine_seed5` as a 120-minute run: width 48, cosine decay to zero at minute "
                                 "120, seed 5; against `small_cosine120_seed5` and `current_seed5` at 120",
                                 ["--lr_scheduler", "cosine", "--seed", "5"], decays_to_budget=True),
    "small_cosine120_seed5": Recipe("`small_cosine_seed5` as a 120-minute run: width 24, cosine decay to zero at "
                                    "minute 120, seed 5; whether the narrow network's constant-rate lead at 120 "
                                    "holds under the presets' schedule",
                                    ["--model_channels", "24", "--lr_scheduler", "cosine", "--seed", "5"],
                                    decays_to_budget=True),
    "peer": Recipe("diffusers UNet2DModel (24-48-48-96, attention at 8x8) at equal FLOPs per step, same loss and loop",
                   ["--arch", "UNet2DPeer", "--peer_channels", PEER_CHANNELS]),
    "edm": Recipe("EDM parameterisation: preconditioning, log-normal sigma, EDM loss weight; EDM DPM-Solver++",
                  ["--parameterization", "edm"]),
    "patch1": Recipe("no patch folding: patch 1, widths halved (24-48-48-96) at equal FLOPs",
                     ["--patch_size", "1", "--model_channels", "24"]),
    "attn_none": Recipe("no attention anywhere", ["--transformer_depth", "0"]),
    "attn8": Recipe("attention at 8x8 tokens (after every residual block of that level) instead of the bottleneck",
                    ["--transformer_depth", "0", "--attention_levels", "2"]),
    "attn16": Recipe("attention at 16x16 tokens instead of the bottleneck",
                     ["--transformer_depth", "0", "--attention_levels", "1"]),
    "selfcond": Recipe("self-conditioning (Analog Bits)", ["--self_condition"]),
    "mask_scaled": Recipe("mask channel as scaled analog bits (+-0.5)", ["--mask_scale", "0.5"]),
    "mask_sdf": Recipe("mask channel as a signed distance map (saturating at 8 px)", ["--mask_encoding", "sdf"]),
    "mask_sdf_seed1": Recipe("the signed-distance mask again with training seed 1: whether its lesion-shape lead holds "
                             "across seeds", ["--mask_encoding", "sdf", "--seed", "1"], repeats="mask_sdf"),
    "mask_sdf_seed2": Recipe("the signed-distance mask again with training seed 2", ["--mask_encoding", "sdf",
                             "--seed", "2"], repeats="mask_sdf"),
    "lr1e-3": Recipe("learning rate 1e-3 (baseline 5e-4): led at 15-30 min, behind from 60", ["--lr", "1e-3"]),
    "lr1e-3_sdf": Recipe("lr 1e-3 with the signed-distance mask (the 30-minute "
                         "leaders on KID and on lesion shape together)", ["--lr", "1e-3", "--mask_encoding", "sdf"]),
    "lr2e-4": Recipe("learning rate 2e-4 (baseline 5e-4)", ["--lr", "2e-4"]),
    "batch32": Recipe("batch 32 (baseline 16)", ["--batch_size", "32"]),
    "batch8": Recipe("batch 8 (baseline 16)", ["--batch_size", "8"]),
    "wide": Recipe("wider and shallower at ~equal FLOPs: width 56, 1 residual block per level",
                   ["--model_channels", "56", "--num_res_blocks", "1"]),
    "deep": Recipe("narrower and deeper at ~equal FLOPs: width 42, 3 residual blocks per level",
                   ["--model_channels", "42", "--num_res_blocks", "3"]),
}
QUICK_FLAGS = ["--model_channels", "16", "--channel_mult", "1,2", "--transformer_depth", "1", "--num_heads", "2",
               "--batch_size", "8", "--warmup_steps", "2", "--save_every", "5", "--log_every", "5",
               "--val_timesteps", "2", "--max_val_images", "16"]
QUICK_RECIPES = {"current": [], "peer": ["--arch", "UNet2DPeer", "--peer_channels", "8,16"],
                 "edm": ["--parameterization", "edm"]}


@dataclass
class Setup:
    data_dir: Path
    work: Path
    n_samples: int
    quick: bool
    threads: int
    img_size: int = 64      # the prepared dataset's size, at which the step FLOPs are counted
    device: str = "cpu"     # where the recipes train and draw: cpu, or a CUDA device

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def clock(self) -> str:
        """train_medsegdiff.py's --budget_clock: CPU minutes of the steps on a CPU, wall minutes on a GPU (whose
        work a CPU clock does not see)."""
        return "wall" if self.on_gpu else "cpu"

    def bench_flags(self) -> list[str]:
        return [*BENCH_FLAGS, "--budget_clock", self.clock, "--device", self.device]

    def decays_to_budget(self, recipe: str) -> bool:
        r = RECIPES.get(recipe)
        return r is not None and r.decays_to_budget and not self.quick

    def recipe_budgets(self, recipe: str, budgets: Sequence[float]) -> list[float]:
        """The budgets at which ``recipe`` is measured: all of them, or only the largest for a recipe whose learning
        rate decays over the budget."""
        return [max(budgets)] if self.decays_to_budget(recipe) else list(budgets)

    def run_dir(self, recipe: str) -> Path:
        return self.work / "runs" / recipe

    def snapshot(self, recipe: str, minutes: float) -> Path:
        return self.run_dir(recipe) / "snapshots" / f"min{minutes:g}.pth"

    def eval_dir(self, recipe: str, minutes: float, ema: str, sampler: str = "") -> Path:
        """Where one evaluation lives; ``sampler`` ("SAMPLER:STEPS:GUIDANCE") only for a non-default sampler."""
        tail = "" if not sampler else "_" + sampler.replace(":", "-")
        return self.work / "eval" / recipe / f"min{minutes:g}_ema{ema}{tail}"

    def recipe_flags(self, recipe: str) -> list[str]:
        if self.quick:
            return QUICK_FLAGS + QUICK_RECIPES[recipe]
        return BASELINE_FLAGS + RECIPES[recipe].flags


def parse_sampler(spec: str) -> tuple[str, int, float]:
    try:
        name, steps, guidance = spec.split(":")
        return name, int(steps), float(guidance)
    except ValueError:
        raise UserError(f"--samplers: {spec!r} is not SAMPLER:STEPS:GUIDANCE (e.g. dpmsolver++:20:1.5)") from None


def default_sampler() -> dict[str, Any]:
    from models.diffusion import DEFAULT_STEPS
    from sampling.generation import DEFAULT_GUIDANCE, DEFAULT_SAMPLER
    return {"name": DEFAULT_SAMPLER, "steps": DEFAULT_STEPS[DEFAULT_SAMPLER], "guidance": DEFAULT_GUIDANCE}


def is_default_sampler(spec: str) -> bool:
    name, steps, guidance = parse_sampler(spec)
    d = default_sampler()
    return (name, steps, guidance) == (d["name"], d["steps"], d["guidance"])
