"""generate_synthetic.py / sampling/generation.py: a valid pair dataset with provenance, byte-identical output for
any batch size, resume after an interruption, rejection and replacement, sharding across processes,
--balance_to arithmetic, and one clear error per bad input."""
import json
import multiprocessing as mp
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import generate_synthetic
from common.errors import UserError
from common.io import sha256_file
from sampling import generation as synthetic
from sampling import plan
from data.pairs import open_pair_dataset, write_index

from conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny 16-px MedSegDiffV2 checkpoint with randomised weights (conftest.make_tiny_checkpoint)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gen"))


def gen(ckpt, out, *extra, after_batch=None):
    argv = ["--checkpoint_path", ckpt, "--output_dir", str(out), "--device", "cpu", "--min_lesion_area", "2",
            *extra]
    return generate_synthetic.main(argv, after_batch=after_batch)


def png_bytes(folder):
    folder = Path(folder)
    return {f"{sub}/{p.name}": p.read_bytes() for sub in ("images", "masks")
            for p in sorted((folder / sub).glob("*.png"))}


BASE = ["--num_samples_per_class", "3", "--sampler", "ddpm", "--steps", "2", "--guidance_scale", "2.0"]


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "syn"
    gen(ckpt, out, *BASE, "--batch_size", "4")
    return out


def test_valid_dataset_with_counts_and_provenance(ckpt, reference, capsys):
    ds = open_pair_dataset(reference)
    assert ds.img_size == 16
    counts = ds.counts()
    assert counts["benign"]["train"]["synthetic"] == 3 and counts["malignant"]["train"]["synthetic"] == 3
    assert sum(r["split"] != "train" or r["source"] != "synthetic" for r in ds.rows) == 0
    sha = sha256_file(ckpt)
    for row in ds.rows:
        label, j = plan.parse_pair_id(row["id"])
        assert row["label"] == label and int(row["candidate"]) == j
        assert int(row["seed"]) == 0 + 1_000_003 * ("benign", "malignant").index(label) + j
        assert row["checkpoint_sha256"] == sha and row["checkpoint"] == "best_model.pth"
        assert (row["sampler"], row["steps"], row["guidance_scale"]) == ("ddpm", "2", "2.0")
        assert int(row["checkpoint_step"]) >= 1 and int(row["lesion_area"]) > 0
    images, masks = ds.load()
    assert all(m.any() for m in masks)
    run = json.loads((reference / "generation.json").read_text())
    assert run["identity"]["checkpoint_sha256"] == sha and run["identity"]["steps"] == 2
    assert (reference / "preview.png").is_file()
    assert json.loads((reference / "dataset.json").read_text())["generation"]["sampler"] == "ddpm"


def test_batch_size_does_not_change_a_byte(ckpt, reference, tmp_path):
    gen(ckpt, tmp_path / "b1", *BASE[2:], "--num_samples_per_class", "2", "--batch_size", "1")
    ref = png_bytes(reference)
    got = png_bytes(tmp_path / "b1")
    assert len(got) == 8 and all(ref[k] == v for k, v in got.items())   # the first 2 of each class


def test_sampler_arithmetic_is_batch_invariant(ckpt):
    """Stronger than comparing PNGs: the float samples are bit-identical for batch 1 and batch 9 (18 rows with
    guidance: two fixed-size denoiser chunks, the second padded)."""
    from models.loading import load_diffusion_checkpoint
    model, diffusion, meta = load_diffusion_checkpoint(ckpt)
    js = synthetic.JointSampler(model, diffusion, meta, torch.device("cpu"), "fp32", "dpmsolver++", 2, 2.0)

    def draw(classes, seeds):
        labels = torch.tensor(classes)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with synthetic.batch_invariant_kernels(torch.device("cpu")):
            return diffusion.sample(js.model, labels, gens, 16, sampler="dpmsolver++", steps=2, guidance_scale=2.0,
                                    null_class=2)

    classes, seeds = [0, 1, 0, 1, 0, 1, 0, 1, 1], list(range(40, 49))
    together = draw(classes, seeds)
    for i in (0, 8):
        assert torch.equal(draw(classes[i:i + 1], seeds[i:i + 1])[0], together[i]), i
    # nor on its position or neighbours: the same samples in reverse order
    backwards = draw(classes[::-1], seeds[::-1])
    assert torch.equal(backwards.flip(0), together)


def test_interrupted_then_resumed_equals_uninterrupted(ckpt, reference, tmp_path):
    out = tmp_path / "r"

    def stop(n_batches):
        if n_batches == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gen(ckpt, out, *BASE, "--batch_size", "2", after_batch=stop)
    assert not (out / "dataset.json").exists()           # not presented as finished
    assert 0 < len(png_bytes(out)) < len(png_bytes(reference))
    with pytest.raises(UserError, match="dataset.json is missing"):
        open_pair_dataset(out)
    gen(ckpt, out, *BASE, "--batch_size", "3")
    assert png_bytes(out) == png_bytes(reference)
    assert open_pair_dataset(out).rows == open_pair_dataset(reference).rows
    # a lost file is redrawn identically; a larger count extends; a smaller one keeps the first N
    (out / "masks" / "syn_malignant_000001.png").unlink()
    gen(ckpt, out, *BASE[2:], "--num_samples_per_class", "4", "--batch_size", "4")
    now = png_bytes(out)
    assert len(now) == 16 and all(now[k] == v for k, v in png_bytes(reference).items())
    gen(ckpt, out, *BASE[2:], "--num_samples_per_class", "2")
    assert sorted(r["id"] for r in open_pair_dataset(out).rows) == [
        "syn_benign_000000", "syn_benign_000001", "syn_malignant_000000", "syn_malignant_000001"]
    assert len(png_bytes(out)) == 8


def test_each_sampler_writes_a_valid_dataset(ckpt, tmp_path):
    for sampler in ("ddpm", "ddim", "dpmsolver++"):
        gen(ckpt, tmp_path / sampler, "--num_samples_per_class", "1", "--sampler", sampler, "--steps", "2")
        ds = open_pair_dataset(tmp_path / sampler)
        assert len(ds) == 2 and {r["sampler"] for r in ds.rows} == {sampler}


def fake_draw(self, class_indices, seeds, candidates=None):
    """A stand-in model: the mask is empty when seed % 3 == 1, else a lesion of 4 + seed % 5 pixels."""
    n = len(seeds)
    images = np.stack([np.full((16, 16), s % 256, np.uint8) for s in seeds])
    masks = np.zeros((n, 16, 16), bool)
    for i, s in enumerate(seeds):
        if s % 3 != 1:
            masks[i, 2, 2:2 + 4 + s % 5] = True
    return images, masks


def expected_first_accepted(n, class_index, min_area, seed=0):
    out, j = [], 0
    while len(out) < n:
        s = seed + 1_000_003 * class_index + j
        if s % 3 != 1 and 4 + s % 5 >= min_area:
            out.append(j)
        j += 1
    return out, j


def test_rejection_replacement_and_rate(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synthetic.JointSampler, "draw", fake_draw)
    gen(ckpt, tmp_path / "a", "--num_samples_per_class", "6", "--batch_size", "4", "--min_lesion_area", "6")
    text = capsys.readouterr().out
    rows = open_pair_dataset(tmp_path / "a").rows
    for ci, label in enumerate(("benign", "malignant")):
        want, k = expected_first_accepted(6, ci, 6)
        assert [int(r["candidate"]) for r in rows if r["label"] == label] == want
        assert f"{label} 6 (rejected {k - 6} of {k} candidates, {100 * (k - 6) / k:.1f}%)" in text
    recs = [json.loads(line) for line in (tmp_path / "a" / "rejected.jsonl").read_text().splitlines()]
    assert recs and all(r["reason"] == "empty mask" for r in recs)
    # components below --min_lesion_area were removed from the kept masks; same set whatever the batch size
    assert all(int(r["lesion_area"]) >= 6 for r in rows)
    gen(ckpt, tmp_path / "b", "--num_samples_per_class", "6", "--batch_size", "1", "--min_lesion_area", "6")
    assert png_bytes(tmp_path / "a") == png_bytes(tmp_path / "b")
    # a record cut short by a crash costs one redraw, never a corrupt file
    with open(tmp_path / "a" / "rejected.jsonl", "a") as fh:
        fh.write('{"label": "beni')
    gen(ckpt, tmp_path / "a", "--num_samples_per_class", "9", "--batch_size", "4", "--min_lesion_area", "6")
    lines = (tmp_path / "a" / "rejected.jsonl").read_text().splitlines()
    assert lines[len(recs)] == '{"label": "beni' and all(json.loads(x) for x in lines[len(recs) + 1:])
    want9 = {c: expected_first_accepted(9, ci, 6)[0] for ci, c in enumerate(("benign", "malignant"))}
    got9 = {c: [int(r["candidate"]) for r in open_pair_dataset(tmp_path / "a").rows if r["label"] == c]
            for c in want9}
    assert got9 == want9


def test_everything_rejected_fails_clearly(ckpt, tmp_path):
    with pytest.raises(UserError, match=r"class benign: gave up after 2 candidates.*--max_candidates_per_sample"):
        gen(ckpt, tmp_path / "x", "--num_samples_per_class", "1", "--steps", "1", "--min_lesion_area", "10000",
            "--max_candidates_per_sample", "2")
    assert not (tmp_path / "x" / "dataset.json").exists()


# ------------------------------------------------------------------ sharding (pure) and a real 2-process run
def simulate(targets, oracle, world, batch, interrupt_after=None, statuses=None, cap_factor=10):
    """The generation loop's planning with `world` ranks (exchange = concatenation), optionally cut short."""
    statuses = statuses or {c: {} for c in targets}
    caps = {c: cap_factor * n for c, n in targets.items()}
    drawn = 0
    while True:
        items = plan.next_round(targets, statuses, caps)
        if not items:
            break
        results = []
        for rank in range(world):
            mine = plan.shard(items, rank, world)
            for start in range(0, len(mine), batch):
                for c, j in mine[start:start + batch]:
                    results.append((c, j, oracle(c, j)))
                    drawn += 1
                    if interrupt_after is not None and drawn >= interrupt_after:
                        for c2, j2, ok in results:
                            statuses[c2][j2] = ok
                        return statuses, None
        for c, j, ok in results:
            statuses[c][j] = ok
    return statuses, {c: plan.selection(n, statuses[c], caps[c])[0] for c, n in targets.items()}


def test_sharding_selection_independent_of_world_size_batch_and_interruption():
    oracle = lambda c, j: (hash((c, j * 7919)) % 10) >= 3   # noqa: E731  ~30% rejected, deterministic
    targets = {"benign": 17, "malignant": 9}
    want = {c: [j for j in range(1000) if oracle(c, j)][:n] for c, n in targets.items()}
    for world in (1, 2, 3):
        for batch in (1, 4):
            _, got = simulate(targets, oracle, world, batch)
            assert got == want, (world, batch)
    partial, none = simulate(targets, oracle, 2, 3, interrupt_after=11)
    assert none is None
    _, resumed = simulate(targets, oracle, 1, 5, statuses=partial)
    assert resumed == want
    # rank r draws every world-th candidate of a round; ranks together draw each exactly once
    items = plan.next_round(targets, {c: {} for c in targets}, {c: 100 for c in targets})
    assert items[:3] == [("benign", 0), ("benign", 1), ("benign", 2)]
    parts = [plan.shard(items, r, 2) for r in range(2)]
    assert parts[0][:2] == [("benign", 0), ("benign", 2)] and sorted(parts[0] + parts[1]) == sorted(items)


def test_plan_and_selection():
    st = {0: True, 1: False, 3: True}
    assert plan.plan_class(3, st, cap=100) == [2]
    assert plan.plan_class(3, st, cap=100, overdraw_rate=0.5) == [2, 4]
    assert plan.selection(2, st, cap=100) == (None, 2)
    assert plan.selection(2, {**st, 2: False}, cap=100) == ([0, 3], 4)
    assert plan.selection(3, {0: False, 1: False}, cap=2) == (None, -1)
    assert plan.plan_class(0, {}, cap=0) == []


def _rank_main(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        generate_synthetic.main(argv)
    except SystemExit as exc:
        os._exit(int(exc.code or 0))
    except BaseException:
        import traceback
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_two_processes_gloo_equal_one(ckpt, reference, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--checkpoint_path", ckpt, "--output_dir", str(tmp_path / "dd"), "--device", "cpu",
            "--min_lesion_area", "2", *BASE, "--batch_size", "2"]
    ctx = mp.get_context("fork")   # the children inherit the imported modules: no second start-up
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, argv)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert png_bytes(tmp_path / "dd") == png_bytes(reference)
    assert open_pair_dataset(tmp_path / "dd").rows == open_pair_dataset(reference).rows
    assert not list((tmp_path / "dd").glob("rejected.rank*.jsonl"))


# ------------------------------------------------------------------ --balance_to
@pytest.fixture
def busi_like(tmp_path):
    """A hand-built index: train split 68 benign / 32 malignant, plus val/test pairs that must not count."""
    rows = [{"id": f"b{i}", "label": "benign", "split": "train", "source": "real", "group": f"b{i}"} for i in range(68)]
    rows += [{"id": f"m{i}", "label": "malignant", "split": "train", "source": "real", "group": f"m{i}"}
             for i in range(32)]
    rows += [{"id": f"v{i}", "label": "malignant", "split": "val", "source": "real", "group": f"v{i}"}
             for i in range(9)]
    rows += [{"id": "n0", "label": "normal", "split": "train", "source": "real", "group": "n0"}]
    tmp_path.joinpath("real").mkdir()
    write_index(tmp_path / "real", rows, 16, "hand-built")
    return str(tmp_path / "real")


def test_balance_to_numbers(busi_like, capsys):
    assert plan.resolve_counts(["benign", "malignant"], None, busi_like, None) == {"benign": 0, "malignant": 36}
    assert plan.resolve_counts(["benign", "malignant"], None, busi_like, 200) == {"benign": 32, "malignant": 68}
    assert plan.resolve_counts(["benign", "malignant"], None, busi_like, 136) == {"benign": 0, "malignant": 36}
    generate_synthetic.main(["--balance_to", busi_like, "--total", "200", "--dry-run"])
    assert "'benign': 32, 'malignant': 68" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"--total 100 is impossible.*68 benign and 32 malignant.*>= 136"):
        plan.resolve_counts(["benign", "malignant"], None, busi_like, 100)
    with pytest.raises(UserError, match="must be even"):
        plan.resolve_counts(["benign", "malignant"], None, busi_like, 201)
    with pytest.raises(UserError, match="choose one"):
        generate_synthetic.main(["--balance_to", busi_like, "--num_samples_per_class", "5", "--dry-run"])
    with pytest.raises(UserError, match="give --balance_to"):
        generate_synthetic.main(["--total", "100", "--dry-run"])
    with pytest.raises(UserError, match="use --classes benign,malignant"):
        generate_synthetic.main(["--balance_to", busi_like, "--classes", "benign,malignant,normal", "--dry-run"])


# ------------------------------------------------------------------ bad input: one clear line, nothing mixed
def test_bad_checkpoints_and_classes(ckpt, tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        gen(str(tmp_path / "nope.pth"), tmp_path / "o")
    (tmp_path / "foreign.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot be read as a safe"):
        gen(str(tmp_path / "foreign.pth"), tmp_path / "o")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a checkpoint written by this project"):
        gen(str(tmp_path / "other.pth"), tmp_path / "o")
    with pytest.raises(UserError, match=r"class normal is not one the checkpoint was trained on \(benign, malignant\)"):
        gen(ckpt, tmp_path / "o", "--classes", "benign,normal")
    with pytest.raises(UserError, match="unknown class cyst"):
        gen(ckpt, tmp_path / "o", "--classes", "benign,cyst")
    with pytest.raises(UserError, match="on the CPU generation runs in fp32"):
        gen(ckpt, tmp_path / "o", "--precision", "bf16")
    assert not (tmp_path / "o").exists()


def test_output_folder_of_another_run_is_refused(ckpt, reference, busi_like, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = png_bytes(out)
    for extra, what in ((["--sampler", "ddim"], "sampler: 'ddpm' here vs 'ddim' now"),
                        (["--seed", "5"], "seed: 0 here vs 5 now"),
                        (["--classes", "malignant"], "classes"),
                        (["--min_lesion_area", "3"], "min_lesion_area: 2 here vs 3 now")):
        argv = [a for a in BASE] + ["--batch_size", "4"]
        with pytest.raises(UserError, match=f"holds samples of a different run.*{what}"):
            gen(ckpt, out, *argv, *extra)
    assert png_bytes(out) == before and (out / "dataset.json").exists()
    with pytest.raises(UserError, match="not empty and holds no generation.json"):
        gen(ckpt, busi_like, *BASE)
    (out / "images" / "stray.png").write_bytes(b"x")
    with pytest.raises(UserError, match="stray.png: a file this run did not write"):
        gen(ckpt, out, *BASE)


def test_preview_has_one_row_per_class_with_pairs(tmp_path):
    """--balance_to often generates one class only: the preview then shows that class, not an empty black row."""
    from PIL import Image

    from common.io import write_png
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for k in range(3):
        write_png(tmp_path / "images" / f"p{k}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
        write_png(tmp_path / "masks" / f"p{k}.png", (rng.random((16, 16)) > 0.5).astype(np.uint8) * 255)
    synthetic._write_preview(tmp_path, {"benign": [], "malignant": ["p0", "p1", "p2"]}, 16)
    one = Image.open(tmp_path / "preview.png").size
    synthetic._write_preview(tmp_path, {"benign": ["p0"], "malignant": ["p0", "p1", "p2"]}, 16)
    two = Image.open(tmp_path / "preview.png").size
    assert one[0] == two[0] and two[1] > one[1]
    synthetic._write_preview(tmp_path, {"benign": [], "malignant": []}, 16)
    assert not (tmp_path / "preview.png").exists()
