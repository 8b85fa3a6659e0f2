"""The system Chromium the browser test drives (Debian chromium; browser downloads do not work here).

`python tests/browser.py` (the Makefile's `browser` step) installs it with apt-get when it is missing and we
are root, and says why not otherwise; it never fails the build: the browser test then skips with that reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

PACKAGES = ["chromium", "chromium-driver"]
# Headless in a container: no sandbox (root), no GPU, and no traffic of its own (updates, sync, QUIC probes).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def install_chromium() -> tuple[str | None, str]:
    """(path to chromium, '') when present or installed; (None, why not) otherwise."""
    path = find_chromium()
    if path:
        return path, ""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, f"Chromium is not installed and this is not root with apt-get: apt-get install {' '.join(PACKAGES)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    log = ""
    for cmd in (install, ["apt-get", "update", "-q"], install):  # the package lists may be stale or missing
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        log = (proc.stdout + proc.stderr)[-1500:]
        if cmd is install and proc.returncode == 0 and find_chromium():
            return find_chromium(), ""
    return None, f"apt-get could not install {' '.join(PACKAGES)}: {log.strip().splitlines()[-1] if log.strip() else '?'}"


if __name__ == "__main__":
    path, why = install_chromium()
    print(f"chromium: {path}" if path else f"chromium: not available ({why}); the browser test will be skipped")
    sys.exit(0)
