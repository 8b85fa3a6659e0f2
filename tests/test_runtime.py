"""The process the CLI starts: help and usage errors without torch (issue 31 item 4), and the CPU policy (issue 30):
thread counts and the OpenMP wait policy read back in a fresh interpreter, --threads / --workers, run.json's record."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO

# every command's --help and two usage errors, in one fresh interpreter; the heavy packages imported after each
STARTUP = """
import json, sys
from app.cli import app, main
names = [c.name or c.callback.__name__.replace('_', '-') for c in app.registered_commands]
calls = [['--help'], *[[n, '--help'] for n in names], ['fit', 'data', '--epochs', 'many'], ['predict']]
seen = []
for args in calls:
    sys.argv = ['itfits', *args]
    try:
        main()
    except SystemExit as e:
        code = e.code
    seen.append([args, code, [m for m in ('torch', 'fastai', 'timm', 'lightgbm') if m in sys.modules]])
print('SEEN ' + json.dumps(seen), file=sys.stderr)
"""


def test_help_and_usage_errors_import_no_torch():
    proc = subprocess.run([sys.executable, "-c", STARTUP], cwd=REPO, capture_output=True, text=True, timeout=120)
    seen = json.loads(proc.stderr.split("SEEN ", 1)[1])
    assert len(seen) > 10  # --help, each command's, the usage errors
    for args, code, heavy in seen:
        assert code in (0, 2), f"itfits {' '.join(args)} exited {code}"  # 2: click's usage error
        assert heavy == [], f"itfits {' '.join(args)} imported {heavy}"
