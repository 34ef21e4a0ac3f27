"""Running the `lighten` command and checking how it refuses bad input.

`lighten(...)` runs the real entry point, `lighten.cli.main`, in this process: the same code a user's command
runs, without the five seconds a new Python process spends importing torch and transformers. The flows that
must run exactly as a user types them (the README's examples, the demo, Ctrl-C) use real subprocesses."""

import contextlib
import io
import os
import signal
import subprocess
import sys

from lighten.cli import main


def lighten(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`lighten ARGS` with `cwd` as the working folder and `env` as the environment; its exit status, stdout
    and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv, here, environ = sys.argv, os.getcwd(), dict(os.environ)
    sigint = signal.getsignal(signal.SIGINT)
    code = 0
    try:
        sys.argv = ["lighten", *map(str, args)]
        if cwd is not None:
            os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
        signal.signal(signal.SIGINT, sigint)
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


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
