"""export_model.py / models/hub.py: a checkpoint exported as a diffusers folder loads with diffusers' from_pretrained
through JointImageMaskPipeline and draws pairs equal to JointDiffusion.sample's; generate_synthetic.py draws the
same pairs from the folder as from the .pth; an interrupted export leaves nothing that looks complete; bad input is
one error line and exit status 2. Nothing touches the network."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import export_model
import generate_synthetic
from common.checkpoint import load_checkpoint, save_checkpoint
from common.cli import run_main
from models.diffusion import DiffusionConfig, model_space_to_images
from models.hub import (INFO_FILE, JointDenoiser, JointImageMaskPipeline, export_fingerprint,
                        pipeline_from_checkpoint, save_export)
from models.loading import load_diffusion_checkpoint

from conftest import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny 16-px MedSegDiffV2 checkpoint with randomised EMA weights (conftest.make_tiny_checkpoint)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def folder(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "tiny"
    assert export_model.main(["--checkpoint_path", ckpt, "--output_dir", str(out)]) == 0
    return out


def exit_line(main, argv, capsys):
    """(exit status, stderr) of a script run through run_main, as on the command line."""
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv)
    return exc.value.code, capsys.readouterr().err


def seeded(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_folder_layout_card_and_provenance(ckpt, folder):
    for f in ("model_index.json", "denoiser/config.json", "denoiser/diffusion_pytorch_model.safetensors",
              "scheduler/scheduler_config.json", "pipeline_busdiff.py", INFO_FILE, "README.md"):
        assert (folder / f).is_file(), f
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "JointImageMaskPipeline"
    assert index["denoiser"] == ["models.hub", "JointDenoiser"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    config = json.loads((folder / "denoiser" / "config.json").read_text())
    source = load_checkpoint(ckpt)
    assert config["arch"] == "MedSegDiffV2" and config["class_names"] == ["benign", "malignant"]
    assert config["diffusion_config"] == source["diffusion"]          # the noise process round-trips
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["step"] == source["step"] and info["source_sha256"] and info["sampler"] == "dpmsolver++"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers")
    for phrase in ("Research use only. Not for clinical use", "redistribution terms are unclear",
                   "Its licence requires", "copyright and permission notice", f"{source['step']} steps",
                   "Not evaluated at export"):
        assert phrase in card, phrase
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]   # no staging left behind


def test_diffusers_from_pretrained_draws_pairs(folder):
    pipe = JointImageMaskPipeline.from_pretrained(folder)   # diffusers' DiffusionPipeline.from_pretrained
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.denoiser, JointDenoiser) and pipe.class_names == ["benign", "malignant"]
    out = pipe(class_labels=["malignant", 0], num_per_class=2, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == out.masks.shape == (4, 16, 16)
    assert out.images.dtype == np.uint8 and out.masks.dtype == np.bool_
    assert out.class_labels == ["malignant", "malignant", "benign", "benign"]
    assert out.images.min() < out.images.max()                     # not a constant image
    pil = pipe(class_labels="benign", num_inference_steps=2, output_type="pil")
    assert pil.images[0].mode == "L" and pil.images[0].size == (16, 16)
    assert set(np.unique(np.asarray(pil.masks[0]))) <= {0, 255}    # binary
    images, masks = pipe(num_inference_steps=2, return_dict=False)  # every class once
    assert images.shape == (2, 16, 16)
    for bad in ("normal", 2, True):
        with pytest.raises(ValueError, match="class"):
            pipe(class_labels=bad, num_inference_steps=2)
    with pytest.raises(ValueError, match="one per sample"):
        pipe(class_labels="benign", num_per_class=2, generator=seeded([1]))


@pytest.mark.parametrize("sampler", ["dpmsolver++", "ddpm"])
def test_pipeline_equals_joint_diffusion_sample(ckpt, folder, sampler):
    """Same seeds, batch and steps: the pipeline's pairs are JointDiffusion.sample's on the .pth, bit for bit (the
    ddpm sampler also draws noise at every step from each sample's generator)."""
    model, diffusion, _ = load_diffusion_checkpoint(ckpt)
    x = diffusion.sample(model, torch.tensor([0, 0, 1, 1, 1]), seeded(range(10, 15)), 16, sampler=sampler, steps=3,
                         guidance_scale=2.0, null_class=2)
    images, masks = model_space_to_images(x)
    pipe = JointImageMaskPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if sampler != "dpmsolver++":   # swapping the scheduler, the diffusers way
        pipe.scheduler = pipe.diffusion.make_scheduler(sampler, 3)
    out = pipe(class_labels=[0, 0, 1, 1, 1], generator=seeded(range(10, 15)), num_inference_steps=3,
               guidance_scale=2.0)
    assert np.array_equal(out.images, images[:, 0].numpy())
    assert np.array_equal(out.masks, masks[:, 0].numpy())


def test_peer_arch_and_edm_process_round_trip(tmp_path):
    """The UNet2DPeer arch with an edm / sdf / self-conditioned noise process: the folder rebuilds both exactly and
    the pipeline (with its EDM Euler scheduler) draws what JointDiffusion.sample draws."""
    from diffusers import DDIMScheduler

    from models.denoisers import build_denoiser
    kwargs = {"img_size": 16, "num_classes": 2, "block_out_channels": [8, 16], "layers_per_block": 1,
              "self_condition": True}
    net = build_denoiser("UNet2DPeer", kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    dcfg = DiffusionConfig(parameterization="edm", mask_encoding="sdf", mask_scale=0.5, self_condition=True)
    ck = {"model_class": "UNet2DPeer", "model_kwargs": kwargs, "diffusion": dcfg.to_dict(),
          "class_names": ["benign", "malignant"], "img_size": 16, "ema": net.state_dict()}
    save_export(pipeline_from_checkpoint(ck, "ddim"), tmp_path / "peer", {"step": 0})
    _, diffusion, meta = load_diffusion_checkpoint(tmp_path / "peer")
    assert diffusion.config == dcfg and meta["model_class"] == "UNet2DPeer"
    assert {k: meta["model_kwargs"][k] for k in kwargs} == kwargs
    x = diffusion.sample(net.eval(), torch.tensor([1, 0]), seeded([3, 4]), 16, sampler="ddim", steps=3,
                         guidance_scale=1.5, null_class=2)
    pipe = JointImageMaskPipeline.from_pretrained(tmp_path / "peer")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "EDMEulerScheduler"
    out = pipe(class_labels=[1, 0], generator=seeded([3, 4]), num_inference_steps=3, guidance_scale=1.5)
    assert np.array_equal(out.images, model_space_to_images(x)[0][:, 0].numpy())
    pipe.scheduler = DDIMScheduler()   # a discrete-time scheduler cannot drive an edm model
    with pytest.raises(ValueError, match="edm-parameterised"):
        pipe(class_labels=[1], num_inference_steps=2)


def test_generic_diffusion_pipeline_with_custom_pipeline(folder, tmp_path):
    """DiffusionPipeline.from_pretrained(folder, custom_pipeline=..., trust_remote_code=True): diffusers' own entry
    point, through the shim in the folder (its module cache in a temporary HF_HOME)."""
    code = ("import sys; from diffusers import DiffusionPipeline; "
            "p = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline='pipeline_busdiff', "
            "trust_remote_code=True); p.set_progress_bar_config(disable=True); "
            "o = p(class_labels='malignant', num_inference_steps=2); print(type(p).__name__, o.images.shape)")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "JointImageMaskPipeline (1, 16, 16)" in proc.stdout


def png_bytes(out):
    return {f"{sub}/{p.name}": p.read_bytes() for sub in ("images", "masks") for p in sorted((out / sub).glob("*.png"))}


def test_generate_synthetic_same_pairs_from_folder_and_pth(ckpt, folder, tmp_path):
    common = ["--device", "cpu", "--min_lesion_area", "2", "--num_samples_per_class", "2", "--sampler", "ddim",
              "--steps", "2", "--guidance_scale", "2.0", "--batch_size", "3"]
    generate_synthetic.main(["--checkpoint_path", ckpt, "--output_dir", str(tmp_path / "pth"), *common])
    generate_synthetic.main(["--checkpoint_path", str(folder), "--output_dir", str(tmp_path / "dir"), *common])
    a, b = png_bytes(tmp_path / "pth"), png_bytes(tmp_path / "dir")
    assert len(a) == 8 and a == b
    ident = json.loads((tmp_path / "dir" / "generation.json").read_text())["identity"]
    assert ident["checkpoint_sha256"] == export_fingerprint(folder)


def test_interrupted_export_leaves_no_complete_looking_folder(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "x"
    real_save = JointImageMaskPipeline.save_pretrained

    def save_then_die(self, path, **kw):
        real_save(self, path, **kw)    # the weights are written, then the process is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(JointImageMaskPipeline, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_model.main(["--checkpoint_path", ckpt, "--output_dir", str(out)])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_model.main(["--checkpoint_path", ckpt, "--output_dir", str(out)])
    first = (out / INFO_FILE).read_text()
    export_model.main(["--checkpoint_path", ckpt, "--output_dir", str(out), "--overwrite", "--sampler", "ddim"])
    assert (out / INFO_FILE).read_text() != first and sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert json.loads((out / "model_index.json").read_text())["scheduler"][1] == "DDIMScheduler"


def test_bad_input_is_one_line_and_exit_2(ckpt, folder, tmp_path, capsys):
    def gen(path):
        return exit_line(generate_synthetic.main, ["--checkpoint_path", str(path), "--output_dir",
                                                   str(tmp_path / "o"), "--device", "cpu"], capsys)

    def one_line(code, err, phrase):
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err

    (tmp_path / "empty").mkdir()
    one_line(*gen(tmp_path / "missing"), "not found")
    one_line(*gen(tmp_path / "empty"), "no busdiff.json")
    broken = tmp_path / "broken"            # the record but no model files
    broken.mkdir()
    (broken / INFO_FILE).write_text((folder / INFO_FILE).read_text())
    one_line(*gen(broken), "cannot load the denoiser")
    other = tmp_path / "other"              # weights that do not fit: diffusers alone would only warn
    shutil.copytree(folder, other)
    weights = other / "denoiser" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop(sorted(state)[0])
    save_file(state, weights)
    one_line(*gen(other), "do not match")
    with pytest.raises(ValueError, match="do not match"):
        JointImageMaskPipeline.from_pretrained(other)
    one_line(*exit_line(export_model.main, ["--checkpoint_path", str(folder)], capsys), "already an exported folder")
    one_line(*exit_line(export_model.main, ["--checkpoint_path", ckpt, "--output_dir", str(folder)], capsys),
             "not empty")
    plain = tmp_path / "plain"
    (plain / "keep.txt").parent.mkdir()
    (plain / "keep.txt").write_text("mine")
    one_line(*exit_line(export_model.main, ["--checkpoint_path", ckpt, "--output_dir", str(plain), "--overwrite"],
                        capsys), "not an exported model folder")
    assert (plain / "keep.txt").read_text() == "mine"
    one_line(*exit_line(export_model.main, ["--checkpoint_path", ckpt, "--output_dir", str(tmp_path / "o2"),
                                            "--metrics", str(tmp_path / "none.json")], capsys), "not found")
    (tmp_path / "m.json").write_text(json.dumps({"generation": {}}))
    one_line(*exit_line(export_model.main, ["--checkpoint_path", ckpt, "--output_dir", str(tmp_path / "o2"),
                                            "--metrics", str(tmp_path / "m.json")], capsys), "no KID/FID")
    one_line(*exit_line(export_model.main, ["--checkpoint_path", ckpt, "--hub_model_id", "a/b"], capsys),
             "--push_to_hub")
    assert not (tmp_path / "o2").exists()


def test_card_names_the_data_its_terms_and_the_quality(ckpt, tmp_path, capsys):
    """Training data recorded as BUS-BRA: its terms, its notice copied beside the card, KID/FID beside the floor
    from a metrics.json of this checkpoint's samples; metrics of another checkpoint's samples are refused, and so is
    --push_to_hub without the notice (before anything touches the network)."""
    from common.io import sha256_file
    from data.pairs import PairDatasetWriter
    raw = tmp_path / "BUSBRA"
    raw.mkdir()
    (raw / "LICENSE.txt").write_text("Copyright (c) 2023 -- the BUS-BRA notice\n")
    yy, xx = np.mgrid[:16, :16]
    with PairDatasetWriter(tmp_path / "pairs", 16) as w:
        for i in range(4):
            w.add(f"busbra_{i:04d}-l", np.full((16, 16), 90, np.uint8), (yy - 8) ** 2 + (xx - 8) ** 2 < 9,
                  label=("benign", "malignant")[i % 2], split="train", source="real", dataset="BUS-BRA")
        w.commit("test", {"source_dataset": "BUS-BRA", "dataset_dir": str(raw)})
    source = load_checkpoint(ckpt)
    source["config"] = {**source["config"], "data_dir": str(tmp_path / "pairs")}
    pth = tmp_path / "busbra.pth"
    save_checkpoint(pth, {k: v for k, v in source.items() if k != "format"})
    (tmp_path / "syn").mkdir()

    def metrics_of(sha):
        (tmp_path / "syn" / "generation.json").write_text(json.dumps({"identity": {"checkpoint_sha256": sha}}))
        m = {"synthetic": {"mean": 0.05}, "floor": {"mean": 0.001, "std": 0.0005}, "n": 8, "verdict": "above floor"}
        (tmp_path / "metrics.json").write_text(json.dumps({
            "generation": {"all": {"kid": m, "fid": {**m, "synthetic": {"mean": 70.0}}}, "headline_reason": "KID"},
            "inputs": {"synthetic_data": str(tmp_path / "syn")}}))
        return ["--checkpoint_path", str(pth), "--metrics", str(tmp_path / "metrics.json")]

    assert export_model.main([*metrics_of(sha256_file(pth)), "--output_dir", str(tmp_path / "e")]) == 0
    card = (tmp_path / "e" / "README.md").read_text()
    for phrase in ("data: BUS-BRA", "- BUS-BRA: W. Gómez-Flores", "kept in `BUSBRA_LICENSE.txt`",
                   "| KID | 0.0500 | 0.0010 ± 0.0005 | 8 | worse than floor |", "| FID | 70.00 |", "sha256 checked",
                   "training split: benign 2, malignant 2"):
        assert phrase in card, phrase
    assert "BUSI" not in card and "if trained on" not in card
    assert (tmp_path / "e" / "BUSBRA_LICENSE.txt").read_text() == (raw / "LICENSE.txt").read_text()
    code, err = exit_line(export_model.main, [*metrics_of("0" * 64), "--output_dir", str(tmp_path / "e2")], capsys)
    assert code == 2 and "another checkpoint" in err
    (raw / "LICENSE.txt").unlink()
    code, err = exit_line(export_model.main, ["--checkpoint_path", str(pth), "--output_dir", str(tmp_path / "e3"),
                                              "--push_to_hub"], capsys)
    assert code == 2 and "--dataset_license" in err and not (tmp_path / "e3").exists()


def test_terms_and_defaults():
    from metrics.model_card import terms_lines
    from models.hub import DEFAULT_GUIDANCE
    from sampling.generation import DEFAULT_GUIDANCE as GENERATION_GUIDANCE
    assert DEFAULT_GUIDANCE == GENERATION_GUIDANCE
    assert "no patient data" in " ".join(terms_lines(["BUSI"], True, None))
    busi = " ".join(terms_lines(["BUSI"], False, None))
    assert "redistribution terms are unclear" in busi and "BUS-BRA" not in busi
    unknown = " ".join(terms_lines(["unknown"], False, None))
    assert "if trained on BUSI" in unknown and "if trained on BUS-BRA" in unknown and "LICENSE.txt" in unknown


def test_readme_python_section_runs_as_written(ckpt, tmp_path, monkeypatch):
    """The README's "Use it from Python" blocks, in order, with its checkpoint and export paths pointed at the tiny
    model: the Python runs and the export command does what it says."""
    import re
    import shlex
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it from Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(python)?\n(.*?)```", section, flags=re.S)
    paths = {"./checkpoints/best_model.pth": ckpt, "./exports/busdiff_model": str(tmp_path / "exported")}
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    ran = []
    for lang, code in blocks:
        for old, new in paths.items():
            code = code.replace(old, new)
        if lang:
            exec(compile(code, "README.md", "exec"), namespace)
        else:
            argv = shlex.split(code.strip())
            assert argv[:2] == ["python", "export_model.py"]
            assert export_model.main(argv[2:]) == 0
        ran.append(lang or "shell")
    assert ran == ["python", "shell", "python"]
    assert namespace["out"].images.shape == (4, 16, 16) and namespace["out"].masks.dtype == np.bool_
