"""The report as a reader sees it: headless Chromium opens report.html at 1400 and 800 CSS pixels wide.

Checks at both widths: every picture decodes (naturalWidth > 0), no console error, no uncaught exception and no
browser log error; at 800 px: no horizontal scrolling (the page fits; wide tables scroll inside their own box),
body text at least 14 px and every figure shown at least at 60 % of its drawn size (so that its lettering stays
readable). Full-page screenshots are kept under ``$SMARTBIOPSY_TEST_ARTIFACTS`` (default
``Testing/artifacts/``, git-ignored). Chromium is the Debian package ``chromium`` (scripts/test.sh installs it
when it can); without it the test skips and says so. The browser is driven through the DevTools protocol over a
pipe with the standard library only (Testing/core/headless_chromium.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from headless_chromium import HeadlessChromium, find_chromium
from report_case import build_case
from SmartBiopsyCoreLib.optional import available
from SmartBiopsyLib.report.writer import write_report

ARTIFACTS = Path(os.environ.get("SMARTBIOPSY_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")

#: Smallest on-screen size of a figure relative to its drawn size at 800 px (figure text is drawn at >= 8 pt at
#: 100 dpi, 11 px: at 0.6 it stays >= 6.7 px, and the body text is HTML at >= 14 px).
MIN_FIGURE_SCALE = 0.6

pytestmark = [
    pytest.mark.skipif(find_chromium() is None, reason="headless Chromium is not installed (Debian package "
                                                       "'chromium'; scripts/test.sh installs it when run as root)"),
    pytest.mark.skipif(not available("matplotlib"), reason="matplotlib is not installed here (no figures to show)"),
]


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser_case")
    build_case(root)
    report = Path(write_report(root))
    out = {}
    with HeadlessChromium(find_chromium()) as browser:
        for width in (1400, 800):
            out[width] = browser.check_page(report, width, screenshot=ARTIFACTS / f"report_{width}px.png")
    return out


@pytest.mark.parametrize("width", (1400, 800))
def test_every_picture_decodes_and_nothing_is_logged_as_error(pages, width):
    page = pages[width]
    assert page["images"], "the report shows no picture"
    broken = [i["alt"] for i in page["images"] if not i["complete"] or i["naturalWidth"] <= 0]
    assert not broken, f"broken pictures at {width} px: {broken}"
    assert not page["errors"], page["errors"]
    assert (ARTIFACTS / f"report_{width}px.png").stat().st_size > 10_000


def test_report_fits_800_px_without_horizontal_scrolling(pages):
    page = pages[800]
    assert page["innerWidth"] == 800
    assert page["scrollWidth"] <= page["innerWidth"], (page["scrollWidth"], page["overflowing"])
    assert not page["overflowing"], page["overflowing"]


def test_report_text_is_readable_at_800_px(pages):
    page = pages[800]
    assert page["viewportMeta"], "no <meta name=viewport>: phones and narrow windows zoom the page out"
    assert page["bodyFontPx"] >= 14 and page["minTextPx"] >= 14, (page["bodyFontPx"], page["minTextPx"])
    small = [(i["alt"], round(i["width"] / i["naturalWidth"], 2)) for i in page["images"]
             if i["naturalWidth"] and i["width"] / i["naturalWidth"] < MIN_FIGURE_SCALE]
    assert not small, f"figures shrunk below {MIN_FIGURE_SCALE:.0%} of their drawn size at 800 px: {small}"
