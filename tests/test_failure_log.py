"""tests/conftest.py's LOWBIT_FAILURE_LOG: failures' tracebacks are written as they happen."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_failures_are_logged_as_they_happen(tmp_path):
    case = tmp_path / "test_case.py"
    case.write_text("def test_passes():\n    assert True\n\n\ndef test_fails():\n    assert 1 + 1 == 3, 'the sum'\n")
    log = tmp_path / "failures.log"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "-p", "tests.conftest", "--rootdir", str(tmp_path), str(case)],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LOWBIT_FAILURE_LOG": str(log)})
    assert run.returncode == 1, run.stdout + run.stderr
    text = log.read_text()
    assert "test_fails (call)" in text and "the sum" in text and "test_passes" not in text
