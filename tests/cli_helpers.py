"""Running the `lighten` command as a user does (a subprocess) and checking how it refuses bad input."""

import os
import subprocess
import sys


def lighten(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lighten", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def assert_refused(result, *phrases, output=None) -> None:
    """Exit 2, exactly one `error:` line holding every phrase, no traceback, nothing printed to stdout, and
    `output` (if given) not created."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert line.startswith("error: ") and result.stderr.count("error:") == 1, result.stderr
    for phrase in phrases:
        assert phrase in line, line
    assert result.stdout == ""
    assert output is None or not os.path.lexists(output)
