"""The package's structure: every module imports alone in either order, and the wheel ships the inspect page."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tformer"


def modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


@pytest.mark.parametrize("order", ["alphabetical", "reverse"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = modules() if order == "alphabetical" else modules()[::-1]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_modules_stay_small():
    sizes = {p.relative_to(ROOT): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 500, max(sizes.items(), key=lambda kv: kv[1])


def test_the_wheel_ships_the_page_and_html_works_from_a_plain_install(tmp_path):
    """`pip wheel .` holds page.html; installed from that wheel (not editable), `tformer inspect --html` writes
    the page."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip("setuptools/wheel are not installed for a build without isolation")
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("tformer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "tformer/inspection/page.html" in names
    # install into a directory on PYTHONPATH, away from the source tree, and run the page export from there
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    script = (
        "import sys\n"
        "from tformer.config import ModelConfig\n"
        "from tformer.checkpoint import save_checkpoint\n"
        "from tformer.data.tokenizer import byte_tokenizer\n"
        "from tformer.model.transformer import build_model\n"
        "import tformer.inspection.export as e\n"
        "assert '/site/' in e.__file__, e.__file__\n"
        "cfg = ModelConfig(arch='decoder', vocab_size=261, d_model=16, n_heads=2, n_decoder_layers=1, d_ff=32,"
        " max_seq_len=32)\n"
        "save_checkpoint('ckpt', build_model(cfg), cfg)\n"
        "byte_tokenizer().save('ckpt/tokenizer.json')\n"
        "from tformer.cli import run\n"
        "run(['inspect', '-c', 'ckpt', '-p', 'hello', '--html', 'page.html'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and '"prompt":"hello"' in page
