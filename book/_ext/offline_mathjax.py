"""Serve MathJax from the built book instead of a CDN, so that equations render offline.

A local Sphinx extension (``_config.yml``: ``sphinx.local_extensions``). MathJax 3 comes
from the pip package ``django-static-mathjax`` (plain static files under
``mathjax/static/mathjax``; nothing of Django is imported); ``_config.yml`` points
``mathjax_path`` at ``_static/mathjax/tex-mml-chtml.js`` and this extension copies the
files that script loads (its input, output with the fonts, menu and accessibility
components; not the 4 MB speech engine) into the built ``_static/mathjax``.
"""
import shutil
from pathlib import Path

PARTS = ("tex-mml-chtml.js", "input", "output", "ui", "a11y", "adaptors")


def mathjax_source() -> Path:
    try:
        import mathjax
    except ImportError:
        raise RuntimeError("the book serves MathJax itself: `pip install django-static-mathjax==3.2.2.1` "
                           "(it is in requirements.txt)") from None
    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    src, dst = mathjax_source(), Path(app.outdir) / "_static" / "mathjax"
    for part in PARTS:
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part, dirs_exist_ok=True)
        else:
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / part, dst / part)


def setup(app):
    mathjax_source()  # a missing package fails the build at once, with what to install
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
