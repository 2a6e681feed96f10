"""scripts/kill_resume.py as a user first meets it: its --help."""

import subprocess
import sys

from tests.conftest import REPO


def test_help_describes_the_script_in_a_whole_sentence():
    result = subprocess.run([sys.executable, "scripts/kill_resume.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert ("resuming must end where an uninterrupted run ends, bit for bit." in text), text
