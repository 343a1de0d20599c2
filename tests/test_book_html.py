"""The built book, looked at in a real browser (headless Chromium, no network).

The HTML is built with execution off (a few seconds; ``make book`` builds it with every
chapter executed, and ``python tests/test_book_html.py _build/html`` checks that build
the same way). Every page is opened in Chromium and read back after its scripts ran:

* MathJax ran from the book itself: no raw TeX delimiters are left in the text and
  every page with math has rendered formulas;
* every dropdown (exercise answers) is a closed <details> with a summary and a body;
* every local image loads (the file exists);
* the Colab badges point where ``_config.yml`` says.
"""
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from merging_helpers.book_build import config_without_execution

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m 'not slow'` leaves it out

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\frac|\\sum|\\operatorname")


class _Page(HTMLParser):
    """Visible text outside code and rendered math; images, links, dropdowns and formulas."""

    SKIP = {"script", "style", "code", "pre", "mjx-container", "mjx-assistive-mml", "textarea"}

    def __init__(self):
        super().__init__()
        self.depth, self.text, self.images, self.links = 0, [], [], []
        self.formulas, self.details, self._in_details, self.summaries = 0, 0, 0, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.SKIP:
            self.depth += 1
        if tag == "mjx-container":
            self.formulas += 1
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "details":
            self.details += 1
        if tag == "summary":
            self.summaries += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth:
            self.text.append(data)


def rendered_dom(page: Path, tmp: Path) -> str:
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp}", "--virtual-time-budget=20000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    if not out.stdout.strip():
        raise RuntimeError(f"chromium returned no DOM for {page}: {out.stderr[-500:]}")
    return out.stdout


def problems(html_dir: Path, tmp: Path) -> list[str]:
    """Everything wrong with the built book in ``html_dir``, one line per problem."""
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    owner_repo = config["url"].rstrip("/").removeprefix("https://github.com/")
    found = []
    pages = sorted(html_dir.glob("book/*.html")) + [html_dir / "index.html"]
    for page in pages:
        if not page.exists():
            found.append(f"{page}: missing")
            continue
        source = page.read_text()
        if re.search(r'<script[^>]+src="(https?:)?//[^"]*mathjax', source, re.IGNORECASE):
            found.append(f"{page.name}: loads MathJax from a CDN")
        dom = _Page()
        dom.feed(rendered_dom(page, tmp))
        text = " ".join(dom.text)
        for m in RAW_TEX.finditer(text):
            found.append(f"{page.name}: raw TeX left after MathJax ran: ...{text[max(0, m.start() - 40):m.end() + 40]}...")
            break
        if ("\\(" in source or "\\[" in source or "math notranslate" in source) and dom.formulas == 0:
            found.append(f"{page.name}: has math but MathJax rendered none")
        if dom.details != dom.summaries:
            found.append(f"{page.name}: {dom.details} dropdowns but {dom.summaries} summaries")
        if source.count("sd-dropdown") and dom.details == 0:
            found.append(f"{page.name}: dropdowns are not <details> elements")
        for src in dom.images:
            if src.startswith(("http:", "https:", "data:")):
                continue
            if not (page.parent / src.split("#")[0].split("?")[0]).exists():
                found.append(f"{page.name}: image {src} does not exist")
        for href in dom.links:
            if "colab.research.google.com/github/" in href:
                want = f"colab.research.google.com/github/{owner_repo}/blob/{config.get('branch', 'main')}/book/reader/"
                if want not in href or not href.endswith(page.stem + ".ipynb"):
                    found.append(f"{page.name}: Colab badge {href} does not point to {want}{page.stem}.ipynb")
    return found


@pytest.fixture(scope="module")
def html_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    # unexecuted chapters have no glued values: their {glue} references are left empty here
    config = config_without_execution((ROOT / "_config.yml").read_text(), ("mystnb.glue", "mystnb.glue_ref"))
    config = config.replace(": book/_ext", f": {ROOT / 'book' / '_ext'}")  # the local extensions' folder
    (out / "_config.yml").write_text(config)
    exe = Path(sys.executable).parent / "jupyter-book"
    done = subprocess.run([str(exe), "build", str(ROOT), "--config", str(out / "_config.yml"), "--path-output",
                           str(out), "--warningiserror", "--keep-going"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "_build" / "html"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install installs it when run as root)")
def test_every_page_renders_offline(html_dir, tmp_path):
    assert problems(html_dir, tmp_path) == []


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_the_check_sees_raw_tex_and_missing_images(html_dir, tmp_path):
    broken = tmp_path / "html"
    shutil.copytree(html_dir, broken)
    page = broken / "book" / "03_ties.html"
    text = page.read_text()
    page.write_text(text.replace('src="../_static/mathjax/tex-mml-chtml.js"',
                                 'src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"')
                    .replace("</article>", '<img src="nowhere.png"></article>', 1))
    found = problems(broken, tmp_path / "profile")
    assert any("raw TeX left" in p for p in found) and any("nowhere.png" in p for p in found), found
    assert any("loads MathJax from a CDN" in p for p in found), found


if __name__ == "__main__":  # check a full build: python tests/test_book_html.py _build/html
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        issues = problems(Path(sys.argv[1]).resolve(), Path(tmp))
    print("\n".join(issues) or f"{sys.argv[1]}: every page renders offline")
    sys.exit(1 if issues else 0)
