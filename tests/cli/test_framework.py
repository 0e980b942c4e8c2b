"""The CLI framework: verb discovery, --config recipes, one-line errors and exit codes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import vitquant.cli as cli
from vitquant.errors import DataError
from vitquant.methods import METHODS, MethodConfig, TrainMethod

ROOT = Path(__file__).resolve().parents[2]


def _fake_module(run_fn, extra=None) -> types.ModuleType:  # noqa: ANN001
    mod = types.ModuleType("fake")

    def add_parser(subparsers):  # noqa: ANN001, ANN202
        p = subparsers.add_parser("fake")
        p.add_argument("--path", default="x")
        p.add_argument("--lr", type=float, default=0.1)
        p.add_argument("--config")
        if extra:
            extra(p)

    mod.add_parser = add_parser
    mod.run = run_fn
    return mod


def _with_fake(monkeypatch: pytest.MonkeyPatch, run_fn, extra=None) -> None:  # noqa: ANN001
    real = cli.discover_commands

    def discover():  # noqa: ANN202
        return {**real(), "fake": _fake_module(run_fn, extra), "broken": ImportError("no numpy")}

    monkeypatch.setattr(cli, "discover_commands", discover)


def test_verbs_are_discovered() -> None:
    _, subs = cli.build_parser()
    assert {"train", "eval", "models", "demo"} <= set(subs)


def test_models_lists_and_no_match_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "nano"]) == 0
    out = capsys.readouterr().out.split()
    assert "vit_nano_patch4_28" in out and all("nano" in n for n in out)
    assert cli.main(["models", "no_such_thing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_user_errors_are_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def raise_data(args: argparse.Namespace) -> int:
        raise DataError("dataset folder /x is empty")

    _with_fake(monkeypatch, raise_data)
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err == "error: dataset folder /x is empty\n"
    assert cli.main(["fake", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: dataset folder /x is empty")


def test_file_not_found_is_wrapped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def open_missing(args: argparse.Namespace) -> int:
        open("/nonexistent/file.bin")  # noqa: SIM115
        return 0

    _with_fake(monkeypatch, open_missing)
    assert cli.main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/nonexistent/file.bin" in err and err.count("\n") == 1


def test_broken_verb_does_not_break_others(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _with_fake(monkeypatch, lambda a: 0)
    assert cli.main(["broken"]) == 2
    assert "unavailable" in capsys.readouterr().err
    assert cli.main(["fake"]) == 0


def test_config_file_sets_defaults_flags_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[argparse.Namespace] = []
    _with_fake(monkeypatch, lambda a: seen.append(a) or 0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("path: from-yaml\nlr: 1e-3\n")
    assert cli.main(["fake", "--config", str(recipe)]) == 0
    assert seen[-1].path == "from-yaml" and seen[-1].lr == pytest.approx(1e-3)
    assert cli.main(["fake", "--config", str(recipe), "--lr", "0.5"]) == 0
    assert seen[-1].lr == 0.5 and seen[-1].path == "from-yaml"
    recipe.write_text("fake:\n  path: nested\n")
    assert cli.main(["fake", "--config", str(recipe)]) == 0
    assert seen[-1].path == "nested"
    recipe.write_text("pth: typo\n")
    assert cli.main(["fake", "--config", str(recipe)]) == 2
    assert "closest: path" in capsys.readouterr().err
    assert cli.main(["fake", "--config", str(tmp_path / "missing.yaml")]) == 2
    recipe.write_text("- a list\n")
    assert cli.main(["fake", "--config", str(recipe)]) == 2


@dataclass
class _ToyConfig(MethodConfig):
    wbits: int = 4
    per_channel: bool = True
    exclude: list[str] = field(default_factory=list, metadata={"help": "globs"})


@METHODS.register("toy-test-method")
class _ToyMethod(TrainMethod):
    name = "toy-test-method"
    Config = _ToyConfig


def test_method_options_become_flags_and_stray_ones_are_refused() -> None:
    from vitquant.cli.train import config_from_args
    from vitquant.errors import ConfigError

    parser, subs = cli.build_parser()
    args = parser.parse_args(
        ["train", "--method", "toy-test-method", "--wbits", "3", "--no-per-channel"]
    )
    cfg = config_from_args(args)
    assert cfg.method_args == {"wbits": 3, "per_channel": False, "exclude": []}
    args = parser.parse_args(["train", "--wbits", "3"])
    with pytest.raises(ConfigError, match="--wbits"):
        config_from_args(args)
    args = parser.parse_args(["train", "--lr", "0.01", "--epochs", "2"])
    cfg = config_from_args(args)
    assert cfg.method == "float" and cfg.lr == 0.01 and cfg.epochs == 2 and cfg.method_args == {}


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vitquant", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_python_m_vitquant_unknown_model(tmp_path: Path) -> None:
    r = _run(
        "train", "--model", "vit_nano_patch4_82", "--data-path", "digits", "--output", str(tmp_path)
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: unknown model 'vit_nano_patch4_82'")
    assert "vit_nano_patch4_28" in r.stderr and r.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())
