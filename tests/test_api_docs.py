"""``scripts/gen_api_docs.py`` runs, ``docs/api.md`` is up to date, and its links resolve."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gen_api_docs.py"
API_MD = ROOT / "docs" / "api.md"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(gen: ModuleType) -> str:
    return gen.generate()


def test_api_md_is_up_to_date(generated: str) -> None:
    current = API_MD.read_text(encoding="utf-8") if API_MD.is_file() else ""
    assert current == generated, "docs/api.md is out of date: run python scripts/gen_api_docs.py"


def test_script_writes_and_checks(gen: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "api.md"
    assert gen.main(["--check", "--output", str(out)]) == 1  # missing
    assert gen.main(["--output", str(out)]) == 0
    assert gen.main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert gen.main(["--check", "--output", str(out)]) == 1


def test_script_runs_as_a_command(tmp_path: Path) -> None:
    out = tmp_path / "api.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("# API reference")


def test_every_public_name_is_documented(gen: ModuleType, generated: str) -> None:
    for modname in gen.MODULES:
        module = importlib.import_module(modname)
        assert f"## `{modname}`" in generated
        for name in getattr(module, "__all__", []):
            assert f"`{modname}.{name}`" in generated, f"{modname}.{name}"


def test_links_point_at_headings(gen: ModuleType, generated: str) -> None:
    headings = {gen.anchor(h) for h in re.findall(r"^#{1,3} (.+)$", generated, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", generated)
    assert links and set(links) <= headings


def test_output_is_reproducible(generated: str) -> None:
    assert not re.search(r" at 0x[0-9a-f]+", generated)
    assert str(ROOT) not in generated


def test_first_paragraph_and_anchor(gen: ModuleType) -> None:
    doc = """Summary line
        continues here.

        Args:
            x: ignored.
    """
    assert gen.first_paragraph(doc) == "Summary line continues here."
    assert gen.first_paragraph(None) == ""
    assert gen.anchor("`vitquant.quant.QuantConfig`") == "vitquantquantquantconfig"
