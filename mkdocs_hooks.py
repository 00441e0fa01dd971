"""MkDocs hooks (mkdocs.yml `hooks:`): the site's home page is the README's entry text, written once.

`docs/index.md` holds only a title and a pointer for readers on GitHub; at build time its body becomes the part of
`README.md` between `<!-- home:start` and `<!-- home:end -->`, with the README's links into `docs/` made relative
to the site (`docs/eval.md` -> `eval.md`).
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent / "README.md"


def readme_home() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- home:start.*?-->\n(.*?)<!-- home:end -->", text, re.DOTALL)
    if match is None:
        raise ValueError(f"{README}: no <!-- home:start --> ... <!-- home:end --> block for the site's home page")
    return re.sub(r"\]\(docs/", "](", match.group(1))


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    title = markdown.splitlines()[0]
    return f"{title}\n\n{readme_home()}"
