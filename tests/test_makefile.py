"""The Makefile's set-up steps tell the user what they install before they install it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_browser_deps_says_what_it_installs_and_why_before_apt_runs(tmp_path):
    """On a machine without Chromium, the message comes first and names the package and its purpose.

    apt-get and sudo are stand-ins that only print their arguments: the test must not install anything.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "apt-get", 'echo "APT-GET $*"\n')
    _script(bin_dir / "sudo", 'exec "$@"\n')
    os.symlink(shutil.which("id"), bin_dir / "id")
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}

    done = subprocess.run([shutil.which("make"), "-s", "-C", str(ROOT), "browser-deps"], env=env,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "installing the Debian package chromium" in out and "headless Chromium" in out
    assert "make test-fast" in out
    assert out.index("installing the Debian package chromium") < out.index("APT-GET update")
    assert "APT-GET install -y -q chromium" in out
