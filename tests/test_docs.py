"""The README and docs/ as a reader meets them: every relative link leads to a file, and the
pictures of the page are the ones the browser test takes (``make screenshots`` retakes them)."""
from __future__ import annotations

import re

from helpers import ROOT

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def shots_taken() -> list[str]:
    """The screenshot names tests/test_browser.py keeps, in order."""
    return re.findall(r'shot\(page, "([^"]+)"\)', (ROOT / "tests" / "test_browser.py").read_text())


def test_every_relative_link_in_the_readme_and_docs_leads_to_a_file():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to nothing: {broken}"


def test_the_readme_shows_every_screenshot_the_browser_test_takes_and_no_other():
    names = shots_taken()
    assert len(names) >= 4, names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.findall(r"!\[[^\]]*\]\(docs/img/([^)]+)\.png\)", readme)
    on_disk = sorted(p.stem for p in (ROOT / "docs" / "img").glob("*.png"))
    assert shown == names, f"README shows {shown}; the browser test takes {names}"
    assert on_disk == sorted(names), f"docs/img holds {on_disk}; run `make screenshots` to retake {names}"
