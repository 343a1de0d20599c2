"""Point the page header's "Launch on Colab" button at the reader's edition of the chapter.

sphinx-book-theme builds that button from the page's own path (``book/<chapter>.ipynb``),
the source notebook, whose glue roles and dropdowns read as raw MyST markup in Colab. The
chapters' in-page badges open ``book/reader/<chapter>.ipynb`` (written by
``python -m merging_helpers.reader_edition``); this extension makes the header button agree.
"""
import re

READER = "reader"


def reader_url(url: str) -> str:
    """``.../blob/<branch>/book/<page>.ipynb`` → ``.../blob/<branch>/book/reader/<page>.ipynb``."""
    return re.sub(r"(/blob/[^/]+/book/)(?!reader/)([^/]+\.ipynb)$", rf"\g<1>{READER}/\g<2>", url)


def _buttons(buttons):
    for button in buttons:
        yield button
        yield from _buttons(button.get("buttons", []))


def point_colab_at_reader(app, pagename, templatename, context, doctree) -> None:
    for button in _buttons(context.get("header_buttons", [])):
        if "colab.research.google.com" in button.get("url", ""):
            button["url"] = reader_url(button["url"])


def setup(app):
    app.connect("html-page-context", point_colab_at_reader, priority=502)  # after the theme's (501)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
