"""Markdown reports as self-contained HTML pages: markdown-it-py (CommonMark and tables), a small
embedded stylesheet, numeric table cells right-aligned, and an id on every heading.

A page must read the same from the run folder and from a copy of it anywhere (a bucket, a
laptop): no external stylesheet, script or font; links stay as the Markdown wrote them (relative
ones, inside the folder). Heading ids are GitHub's slugs, so `#large-eps` lands on
`### large-eps` in report.md on GitHub and in report.html alike. markdown-it is imported on first
use, so importing this module stays cheap. No TensorFlow, no Ray.
"""

from __future__ import annotations

import html
import re

__all__ = ["STYLE", "html_page", "slug"]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; color: #1f2328; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; display: block; \
overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f6f8fa; padding: .1em .3em; border-radius: 4px; font-size: .9em; }
img { max-width: 100%; height: auto; }
a { color: #0969da; }
"""

# A cell that is a number: an accuracy (maybe an upper bound `<= 0.960 (upper bound: ...)` or
# with its method `0.912 (crown-ibp)`), a count, or a duration (`57 s`, `4 min 12 s`).
_NUMERIC = re.compile(
    r"^(<= )?[-+]?\d+(\.\d+)?(e[-+]?\d+)?( \(.*\))?$"
    r"|^\d+ (s|min \d+ s|h \d+ min)$"
)


def slug(text: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to `-`.

    Example:
        >>> slug("What the flags mean"), slug("large-eps"), slug("Certified <= robust (test)")
        ('what-the-flags-mean', 'large-eps', 'certified--robust-test')
    """
    kept = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return kept.replace(" ", "-")


def _parser():
    from markdown_it import MarkdownIt

    # html=False: text such as `<= 0.96` is text, never markup (the reports write no HTML).
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _mark_tokens(tokens) -> None:
    """Gives headings their slug (unique within the page) and numeric cells `class="num"`."""
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens[:-1]):
        nxt = tokens[i + 1]
        if tok.type == "heading_open" and nxt.type == "inline":
            base = slug(nxt.content)
            n = seen.get(base, 0)
            seen[base] = n + 1
            tok.attrSet("id", base if n == 0 else f"{base}-{n}")
        elif tok.type == "td_open" and nxt.type == "inline" and _NUMERIC.match(nxt.content.strip()):
            tok.attrSet("class", "num")


def html_page(markdown: str, title: str) -> str:
    """The Markdown as a whole HTML page with the embedded stylesheet.

    Args:
        markdown: the report (CommonMark with GitHub tables).
        title: the page's title.

    Returns:
        The page's text.
    """
    md = _parser()
    tokens = md.parse(markdown)
    _mark_tokens(tokens)
    body = md.renderer.render(tokens, md.options, {})
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"{body}</body>\n</html>\n"
    )
