"""The report as a reader sees it: rendered by a real headless browser (Debian's `chromium`), screenshot checked.

Slow (starts a browser) and skipped where no Chromium is installed (`apt-get install chromium`). The check counts the
pixels of matplotlib's first two line colours in the screenshot: a page whose plots load shows thousands of them; the
same page with its PNGs missing (broken images) shows almost none, which the test also verifies so the check can fail.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from seqedit.cli import main
from tests_support import counterfact_records, write_driver_assets

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
LINE_COLOURS = np.array([[31, 119, 180], [255, 127, 14]], dtype=float)  # matplotlib C0 blue, C1 orange


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 3000) -> np.ndarray:
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={width},{height}", f"--screenshot={out}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert out.is_file(), proc.stderr[-2000:]
    import matplotlib.image

    return (matplotlib.image.imread(out)[..., :3] * 255.0).astype(float)


def line_pixels(img: np.ndarray) -> int:
    dist = np.abs(img[:, :, None, :] - LINE_COLOURS[None, None]).max(-1)  # [H, W, colours]
    return int((dist.min(-1) <= 12).sum())


def dom(page: Path) -> str:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
def test_report_renders_in_a_browser(tmp_path):
    write_driver_assets(tmp_path)
    (tmp_path / "cf.json").write_text(json.dumps(counterfact_records(120)))
    runs = tmp_path / "runs"
    base = [f"model.name={tmp_path / 'model'}", f"data.source={tmp_path / 'cf.json'}", f"runs_dir={runs}",
            "threads=1", "n_edits=80", "eval.final=false",
            "probes=[{name: retention, schedule: 'every:10'}, {name: perplexity, schedule: 'every:10', path: "
            f"'{tmp_path / 'text.txt'}'}}]"]
    assert main(["run", *base, "editor.name=random", "editor.spike_probability=0.03", "editor.spike_factor=200",
                 "--no-report"]) == 0
    assert main(["run", *base, "editor.name=noop", "--no-report"]) == 0
    dirs = sorted(p for p in runs.iterdir() if p.is_dir())
    rep = tmp_path / "rep"
    assert main(["report", *map(str, dirs), "--out", str(rep)]) == 0

    text = dom(rep / "index.html")
    assert "seqedit report: 2 runs" in text and text.count('class="run"') == 2
    assert "disabling edits:" in text and "Curves" in text

    img = screenshot(rep / "index.html", tmp_path / "shot.png")
    assert img.shape[0] >= 2000 and img.shape[1] >= 1000
    assert img.std() > 20  # not a blank page
    shown = line_pixels(img)
    assert shown > 3000, shown  # the plots' lines are on screen

    broken = tmp_path / "broken"
    shutil.copytree(rep, broken)
    for png in broken.glob("*.png"):
        png.unlink()
    missing = line_pixels(screenshot(broken / "index.html", tmp_path / "broken.png"))
    assert missing < shown / 20, (missing, shown)  # the same check on broken images fails
