"""`lighten report`: the Pareto front by hand, and the page of a real sweep opened in headless Chromium
(Debian's package): it loads with no console message, each model's size plot has one point per finished
job, sorting by a column orders the table by it, and a screenshot is written."""

import os
import re
import shutil
import subprocess

import pytest
from cli_helpers import assert_refused, lighten

from lighten.sweep.report import pareto_front


def test_pareto_front_by_hand():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 6), (4, 1)]  # lower is better on both
    assert pareto_front(points) == [0, 1, 3]  # (2, 6) and (3, 4) are beaten; the tie keeps one


def test_report_in_a_browser(swept, tmp_path):
    results, jobs, rows = swept
    page = tmp_path / "report.html"
    result = lighten("report", results, "-o", page)
    assert result.returncode == 0, result.stderr
    assert not re.search(r'(src|href)="(?!#|data:)', page.read_text())  # nothing to fetch

    dom, console = _chromium("--dump-dom", f"{page.as_uri()}#sort=KL")
    assert 'data-ready="yes"' in dom and "CONSOLE" not in console, console
    done = [r for r in rows if r["status"] == "done"]
    size_plot = re.search(r'<g id="points-0-size">(.*?)</g>', dom, re.S).group(1)
    assert size_plot.count("<use") == len(done)  # one point per finished job
    kl = [float(v) for v in re.findall(r'data-col="KL" data-value="([^"]+)"', dom)]
    assert len(kl) == len(done) and kl == sorted(kl)  # sorted by KL, the failed job (no KL) last

    shot = tmp_path / "report.png"
    _chromium("--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
    assert shot.read_bytes().startswith(b"\x89PNG")

    assert_refused(lighten("report", tmp_path / "nothing", "-o", tmp_path / "r.html"), "no sweep results")
    assert_refused(lighten("report", results, "-o", page), "exists")


def _chromium(*args) -> tuple[str, str]:
    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium (make setup installs it)")
        pytest.skip("needs Debian's chromium: apt-get install chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr
