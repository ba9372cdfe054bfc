"""The built wheel carries conf/ and recipes/ and works from any directory (non-editable install)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_runs_outside_the_repo(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
                   check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("grpo_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "grpo_cli/conf/config.yaml" in names
    assert "grpo_cli/recipes/quickstart.yaml" in names
    assert "grpo_cli/conf/model/smollm2_135m_instruct.yaml" in names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH puts the installed copy ahead of the editable checkout on sys.path.
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run([sys.executable, "-c", "import grpo_cli.config as c; print(c.config_dir())"],
                           capture_output=True, text=True, cwd=elsewhere, env=env, check=True)
    assert where.stdout.strip() == str(site / "grpo_cli" / "conf")
    result = subprocess.run([sys.executable, "-m", "grpo_cli", "config", "recipe=quickstart"],
                            capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "recipe: quickstart" in result.stdout
