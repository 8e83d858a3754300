"""mkdocs hooks: repository files outside docs/ that the site shows, and links that work on GitHub and in the site.

The pages are written to be read in the repository too, so they link to files by their relative paths
(``../bench/RESULTS.md``, ``../CONTRIBUTING.md``). In the site:

* the Markdown files in ``EXTERNAL_PAGES`` become pages of their own (bench/RESULTS.md is the benchmarks' full
  record), and links to them point at those pages;
* a link to any other file of the repository outside docs/ (a source file, the licence) becomes its text
  followed by the path in code, since the site does not hold that file;
* a link to a path that does not exist is reported as a warning, which ``mkdocs build --strict`` turns into a
  failure (mkdocs itself checks the links between pages and to anchors).

The pages also indent what belongs to a list item by two spaces, as GitHub reads it; Python-Markdown wants four
(a formula block or a second paragraph inside an item would otherwise end the list), so every indentation inside
a list is doubled for the site.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# Repository file -> its page in the site (a path inside docs/, which must not exist there).
EXTERNAL_PAGES = {
    "bench/RESULTS.md": "benchmarks-results.md",
    "CONTRIBUTING.md": "contributing.md",
    "CHANGELOG.md": "changelog.md",
}
LIST_ITEM = re.compile(r"^(?:[*+-]|\d+\.)\s")
LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(([^()\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
log = logging.getLogger("mkdocs.hooks.links")


def on_files(files, config):
    for repo_path, page in EXTERNAL_PAGES.items():
        files.append(File.generated(config, page, abs_src_path=str(ROOT / repo_path)))
    return files


def _source_path(page_src_uri: str) -> str:
    """The repository path of a page (docs/x.md, or bench/RESULTS.md for its generated page)."""
    for repo_path, page in EXTERNAL_PAGES.items():
        if page == page_src_uri:
            return repo_path
    return "docs/" + page_src_uri


def _rewrite(target: str, text: str, image: str, source: str, page_uri: str) -> str | None:
    """The site's version of one link, or None to keep it as it is."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path, _, anchor = target.partition("#")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
    suffix = "#" + anchor if anchor else ""
    page_dir = posixpath.dirname(page_uri)
    if resolved.startswith("docs/") and source.startswith("docs/"):
        return None  # between files of the site: mkdocs checks it
    if resolved.startswith("docs/"):  # from an external page into docs/
        new = posixpath.relpath(resolved[len("docs/") :], page_dir or ".")
        return f"{image}[{text}]({new}{suffix})"
    if resolved in EXTERNAL_PAGES:
        new = posixpath.relpath(EXTERNAL_PAGES[resolved], page_dir or ".")
        return f"{image}[{text}]({new}{suffix})"
    if resolved.startswith("..") or not (ROOT / resolved).exists():
        log.warning("%s: link to %r: no such file in the repository (%s)", source, target, resolved)
        return None
    if image:
        log.warning("%s: image %r lies outside docs/, where the site cannot show it", source, target)
        return None
    return f"{text} (`{resolved}`)" if text.strip("`") != resolved else f"`{resolved}`"


def widen_list_indents(markdown: str) -> str:
    """Double the leading spaces of every line inside a top-level list (two-space continuations become four)."""
    out = []
    in_list = fenced = False
    lines = markdown.split("\n")
    for i, line in enumerate(lines):
        if FENCE.match(line) and not in_list:
            fenced = not fenced
        if fenced:
            out.append(line)
            continue
        if LIST_ITEM.match(line):
            if in_list and out and out[-1].startswith(" ") and out[-1].strip():
                out.append("")  # Python-Markdown would read the item as the previous paragraph's continuation
            in_list = True
        elif in_list and line.strip() and not line.startswith(" "):
            in_list = False
        if in_list and line.startswith(" "):
            stripped = line.lstrip(" ")
            line = " " * (2 * (len(line) - len(stripped))) + stripped
        out.append(line)
        if in_list and not line.strip():  # a blank line ends the list unless an indented line or an item follows
            following = next((x for x in lines[i + 1 :] if x.strip()), "")
            if not (following.startswith(" ") or LIST_ITEM.match(following)):
                in_list = False
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    source = _source_path(page.file.src_uri)
    markdown = widen_list_indents(markdown)
    out = []
    fenced = False
    for line in markdown.split("\n"):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        if not fenced:

            def sub(m, _source=source):
                new = _rewrite(m.group(3), m.group(2), m.group(1), _source, page.file.src_uri)
                return m.group(0) if new is None else new

            line = LINK.sub(sub, line)
        out.append(line)
    return "\n".join(out)
