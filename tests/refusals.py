"""Shared by the bad-input sweep's tests: run a script as a user would, and check a refusal is one line + exit 2."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(script, *argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def one_line_refusal(res, *needles):
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, err[-800:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("error:"), err
    for n in needles:
        assert n in err, (n, err)
