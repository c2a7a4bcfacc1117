"""Every command README.md and docs/*.md show for the project's scripts parses: the script exists, every flag is one of its
flags with a valid value, and every --config preset it names exists and holds only that script's flags."""
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from common.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]


def load_script(rel: str):
    """The script module at ``rel`` (a top-level script, or one under bench/)."""
    path = ROOT / rel
    if path.parent == ROOT:
        return importlib.import_module(path.stem)
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def readme_commands(paths=None):
    paths = paths or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in paths)
    # shell blocks only: a fence opens a block at the start of a line, with no language or a shell one
    blocks = [code for lang, code in re.findall(r"^```([\w+-]*)\n(.*?)^```", text, flags=re.S | re.M)
              if lang in ("", "bash", "sh", "shell", "console")]
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith(("python ", "torchrun ")):
                continue          # prose or a layout drawn in a plain block
            words = shlex.split(line)
            if words[:1] == ["torchrun"]:   # torchrun's own options come before the script
                script = next((i for i, w in enumerate(words) if w.endswith(".py")), len(words))
                words = ["python"] + words[script:]
            if len(words) >= 2 and words[0] == "python" and words[1].endswith(".py") and "..." not in words:
                commands.append(words[1:])
    return commands


COMMANDS = readme_commands()


def test_readme_shows_every_phase():
    shown = {Path(c[0]).stem for c in readme_commands([ROOT / "README.md"])}
    assert {"prepare_busi_dataset", "train_medsegdiff", "generate_synthetic", "create_combined_dataset",
            "train_segmentation", "evaluate", "export_model"} <= shown
    assert "segment_with_diffusion" in {Path(c[0]).stem for c in COMMANDS}     # in docs/model.md


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert (ROOT / argv[0]).is_file(), f"README names {argv[0]}, which is not a script of the project"
    module = load_script(argv[0])
    args = parse_config(module.build_parser(), argv[1:])
    assert not getattr(args, "dry_run", False)
