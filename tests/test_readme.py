"""README.md stays true: its Python quick start runs as written, and the full-scale commands name
recipes that exist and parse with the real command line."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

import vitquant.cli as cli
from vitquant.cli._common import apply_config_file
from vitquant.train.recipes import list_recipes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    """The text of the README section whose heading starts with ``## title``."""
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def test_quick_start_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (code,) = _blocks(_section("Quick start"), "python")
    lines = code.strip().splitlines()
    assert len(lines) <= 16, "the quick start must stay short"
    for call in ("create_model", "prepare", "calibrate", "evaluate", "save_quantized"):
        assert f"{call}(" in code, call
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (our own README)
    printed = out.getvalue()
    assert "'top1'" in printed and "'top5'" in printed
    assert (tmp_path / "nano.w8a8.safetensors").is_file()
    # the int8 model it builds predicts as the fake-quantized model it exported
    model, int8, data = namespace["model"], namespace["int8"], namespace["data"]
    agree = total = 0
    with torch.no_grad():
        for images, _ in data["val"]:  # type: ignore[index]
            a = model(images).argmax(-1)  # type: ignore[operator]
            b = int8(images).argmax(-1)  # type: ignore[operator]
            agree, total = agree + int((a == b).sum()), total + len(a)
    assert total > 0 and agree / total >= 0.9


def _config_commands() -> list[list[str]]:
    """The README's shell commands that run ``vitquant ... --config`` (continuations joined)."""
    commands = []
    for block in _blocks(README, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if "--config" not in line:
                continue
            argv = shlex.split(line)
            if argv[0] == "torchrun":  # torchrun --nproc_per_node N -m vitquant ...
                argv = argv[argv.index("vitquant") + 1 :]
            else:
                assert argv[0] == "vitquant", line
                argv = argv[1:]
            commands.append(argv)
    return commands


def test_full_scale_commands_parse_with_their_recipes() -> None:
    commands = _config_commands()
    assert len(commands) >= 10
    for argv in commands:
        parser, subs = cli.build_parser()  # fresh: a recipe sets the parser's defaults
        args = apply_config_file(parser, subs[argv[0]], parser.parse_args(argv), argv)
        assert args.command in ("train", "calibrate") and args.data_path == "/data/imagenet"
        if args.command == "train":
            from vitquant.cli.train import config_from_args

            assert config_from_args(args).method != "float"


def test_every_recipe_is_in_the_readme_and_every_named_one_exists() -> None:
    named = set(re.findall(r"recipes/([\w.-]+)\.yaml", README))
    shipped = set(list_recipes())
    assert named <= shipped, sorted(named - shipped)
    assert shipped <= named, sorted(shipped - named)


def test_demo_results_placeholder_is_marked() -> None:
    assert "<!-- DEMO-RESULTS-START" in README and "<!-- DEMO-RESULTS-END -->" in README
