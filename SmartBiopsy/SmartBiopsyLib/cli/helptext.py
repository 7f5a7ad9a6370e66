"""Plain text for ``--help`` from the reStructuredText of the command modules' docstrings."""
from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?\w+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_LINK = re.compile(r"`([^`<]+?)(?:\s*<[^>]+>)?`_+")
_INTERPRETED = re.compile(r"`([^`]+)`")


def plain_help(text: str) -> str:
    """``text`` without reST markup: ``x``, :class:`x`, `x`_ and `x` become x; a trailing :: becomes :."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).startswith(":class:") else m.group(1), text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    return re.sub(r"::(\s*)$", r":\1", text, flags=re.M)
