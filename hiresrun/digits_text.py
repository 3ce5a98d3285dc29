"""Digit prompts: the templates the embedded latent text model (`model=tiny-sd-mnist`) was trained on, and the
digit a prompt asks for (prompt_acc).

Training image i of digit d gets template i mod T filled with d (words or numerals as the template says), so a
caption is a function of the image alone (exact resume). The shipped sampling set `assets/prompts/digits.txt`
gives image (seed) s the digit s mod 10, cycling through the templates every ten lines.
"""

from __future__ import annotations

import re

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {word}", "the number {digit}", "a picture of the digit {word}",
             "handwritten number {word}", "the digit {digit}")
_TOKEN = re.compile(r"\b(" + "|".join(WORDS) + r"|[0-9])\b")


def caption(digit: int, index: int) -> str:
    """The training caption of image `index` showing `digit`."""
    return TEMPLATES[index % len(TEMPLATES)].format(word=WORDS[digit], digit=digit)


def prompt_set() -> list[str]:
    """The shipped sampling prompts: line k asks for digit k mod 10 through template k // 10."""
    return [TEMPLATES[t].format(word=WORDS[d], digit=d) for t in range(len(TEMPLATES)) for d in range(10)]


def requested_digit(prompt: str) -> int | None:
    """The one digit a prompt names (a word zero-nine or a numeral), or None when it names none or several."""
    found = {m if m.isdigit() else str(WORDS.index(m)) for m in _TOKEN.findall(prompt.lower())}
    return int(found.pop()) if len(found) == 1 else None


def vocabulary() -> list[str]:
    """Every word the templates use (the tiny tokenizer gives each its own token)."""
    words = {w for t in TEMPLATES for w in t.replace("{word}", "").replace("{digit}", "").split()}
    return sorted(words | set(WORDS) | {str(d) for d in range(10)})
