"""Every script runs as documented (`python scripts/NAME.py`) from any directory."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT_DIR = Path(__file__).resolve().parents[1] / "scripts"
SCRIPTS = sorted(p for p in SCRIPT_DIR.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help_runs_from_another_directory(script, tmp_path):
    out = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # absl's --help exits with status 1, argparse's with 0; neither prints a traceback.
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "usage" in out.stdout.lower() or "flags:" in out.stdout.lower(), out.stdout[:500]
