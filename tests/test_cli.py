"""Command-line error handling and the demo entry point."""
from __future__ import annotations

import subprocess
import sys

from cimstat.cli import run_cli
from cimstat.errors import ModelError


def test_run_cli_turns_cimstat_errors_into_one_line(capsys):
    def main(argv):
        raise ModelError("unknown model 'vgg'; expected one of ['default']")

    assert run_cli(main, []) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown model 'vgg'; expected one of ['default']"


def test_cli_error_has_no_traceback(tmp_path):
    code = ("from cimstat.cli import run_cli\n"
            "from cimstat.models import load\n"
            "raise SystemExit(run_cli(lambda argv: load('resnet18-imagenet', weights='/nonexistent.pth')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr
