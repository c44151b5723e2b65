"""Final-answer extraction: the content of a response's ``\\boxed{}`` (or ``\\fbox{}``). A leaf module: it imports
nothing of the project, so the verifier pool, the data readers and the API share one implementation."""

from __future__ import annotations

import re

BOX_COMMANDS = ("\\boxed", "\\fbox")


def boxed(answer: str) -> str:
    """``answer`` wrapped in ``\\boxed{}``."""
    return "\\boxed{" + answer + "}"


_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character (skipped), or a brace


def find_boxes(text: str) -> list[str]:
    """Contents of the complete, non-nested ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, in order.

    Braces are balanced; escaped braces (``\\{``, ``\\}``) do not count. ``\\boxed 5`` (a single token after a
    space, as some models write) is accepted. An unclosed box (a truncated response) is not an answer.
    One pass: the next occurrence of each command is searched for again only once the scan has passed it, so the
    time is linear in ``len(text)`` however many boxes there are.
    """
    found: list[str] = []
    pos, n = 0, len(text)
    upcoming = {cmd: text.find(cmd) for cmd in BOX_COMMANDS}  # the next occurrence at or after pos (-1: none)
    while True:
        for cmd, at in upcoming.items():
            if 0 <= at < pos:
                upcoming[cmd] = text.find(cmd, pos)
        starts = [(at, cmd) for cmd, at in upcoming.items() if at >= 0]
        if not starts:
            return found
        start, cmd = min(starts)
        i = start + len(cmd)
        if i < n and (text[i].isalpha()):  # \boxedfoo is another macro
            pos = i
            continue
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == "{":
            depth, j = 0, -1
            for token in _BRACE_TOKENS.finditer(text, i):
                if token[0] == "{":
                    depth += 1
                elif token[0] == "}":
                    depth -= 1
                    if depth == 0:
                        j = token.start()
                        break
            if j < 0:  # unclosed: nothing after it can be a complete box either
                return found
            found.append(text[i + 1 : j])
            pos = j + 1
        elif i > start + len(cmd) and i < n:  # "\boxed 5": up to whitespace or '$'
            j = i
            while j < n and not text[j].isspace() and text[j] != "$":
                j += 1
            found.append(text[i:j])
            pos = j
        else:
            pos = i


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{}`` in ``text`` (stripped), or None."""
    boxes = find_boxes(text)
    return boxes[-1].strip() if boxes else None


def has_box(text: str) -> bool:
    return any(cmd in text for cmd in BOX_COMMANDS)
