"""
The README's test command, C{scripts/test}, as a new user meets it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_without_root_it_names_the_packages_to_install_and_runs_nothing(tmp_path: Path) -> None:
    """
    On a machine without chromium, redis-server and systemd-analyze, a user
    who is not root is told the one C{apt-get install} line to run, and no
    virtualenv is made and no test runs.  The machine is a C{PATH} with only
    what the script needs, and an C{id} that answers for a plain user.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    # The interpreter itself, not a shim (pyenv's need more than this PATH).
    (bin_dir / "python3.11").symlink_to(os.path.realpath(sys.executable))
    fake_id = bin_dir / "id"
    fake_id.write_text("#!/bin/sh\necho 1000\n")
    fake_id.chmod(0o755)
    venv = ROOT / ".venv" / "pyvenv.cfg"
    before = venv.stat().st_mtime_ns if venv.exists() else None

    result = subprocess.run(
        [str(bin_dir / "bash"), str(ROOT / "scripts" / "test")],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1, result.stderr
    assert "sudo apt-get install -y systemd chromium redis-server" in result.stderr
    assert result.stdout == ""
    assert (venv.stat().st_mtime_ns if venv.exists() else None) == before
