"""A griffe extension for the API reference: the package's free-form docstrings, read as Markdown.

The docstrings are prose written for ``help()``; three of their habits would render wrongly as Markdown, so this
extension rewrites them (in the documentation build only; the source is untouched):

* Sphinx roles (``:func:`name```, ``:class:`~a.b.C```) become code spans (``name``, ``C``).
* "Options:" blocks (``name`` — text, one option per less-indented line, ``*`` bullets nested under an option)
  become Markdown lists.
* Field lines (``name:   text`` or ``a, b:   text``, two or more spaces after the colon, as in argument lists)
  become list items.

Lines indented four or more spaces after a blank line (formulas) stay code blocks, as Markdown has them.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`~?([^`]+)`")
FIELD = re.compile(r"^(\s*)([A-Za-z_][\w.]*(?:, [A-Za-z_][\w.]*)*|``[^`]+``):\s{2,}(\S.*)$")
OPTIONS = re.compile(r"^(\s*)Options:\s*(.*)$")
BULLET = re.compile(r"^\s*[*-]\s+")


def _role(match: re.Match) -> str:
    target = match.group(1)
    if match.group(0).split("`", 1)[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _options(lines: list, start: int) -> tuple:
    """The "Options:" block that starts at ``lines[start]`` as Markdown list lines, and the index after it."""
    head = OPTIONS.match(lines[start])
    out = ["Options:", ""]
    i = start + 1
    block = []
    if head.group(2):  # "Options: ``patch`` — ...": one option, continued on the following lines
        block.append((0, head.group(2)))
        base = None
    else:
        base = None
    while i < len(lines) and lines[i].strip():
        ind = _indent(lines[i])
        if base is None and not head.group(2):
            base = ind
        block.append((ind, lines[i].strip()))
        i += 1
    items: list = []
    for ind, text in block:
        if head.group(2):
            if items:
                items[-1][1].append(text)
            else:
                items.append(["item", [text]])
        elif ind <= base:
            items.append(["item", [text]])
        elif BULLET.match(text):
            items.append(["sub", [BULLET.sub("", text)]])
        elif items:
            items[-1][1].append(text)
        else:
            items.append(["item", [text]])
    for kind, texts in items:
        prefix = "- " if kind == "item" else "    - "
        out.append(prefix + " ".join(texts))
    out.append("")
    return out, i


def _fields(lines: list, start: int) -> tuple:
    """A run of field lines ("name:   text", continuations indented deeper) as a Markdown list."""
    out = [""]
    i = start
    base = _indent(lines[start])
    while i < len(lines):
        m = FIELD.match(lines[i])
        if m and _indent(lines[i]) == base:
            names = ", ".join(f"`{n}`" for n in m.group(2).strip("`").split(", "))
            out.append(f"- {names}: {m.group(3).strip()}")
        elif lines[i].strip() and _indent(lines[i]) > base and len(out) > 1:
            out[-1] += " " + lines[i].strip()
        else:
            break
        i += 1
    out.append("")
    return out, i


def markdown(text: str) -> str:
    """A docstring's text with the rewrites above."""
    text = ROLE.sub(_role, text)
    lines = text.split("\n")
    out: list = []
    i = 0
    fenced = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and OPTIONS.match(line):
            block, i = _options(lines, i)
            out += block
            continue
        previous_blank = not out or not out[-1].strip()
        if not fenced and FIELD.match(line) and (previous_blank or _indent(line) < 4):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if FIELD.match(nxt) or previous_blank or (nxt.strip() and _indent(nxt) > _indent(line)):
                block, i = _fields(lines, i)
                out += block
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class FreeFormDocstrings(griffe.Extension):
    """Rewrites every loaded object's docstring with :func:`markdown`."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
