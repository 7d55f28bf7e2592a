"""The safety filter's word list (--safety-words FILE, $QIMG_SAFETY_WORDS): one word or phrase a line, `#` comment
lines, any language; matched against a prompt after both are folded the same way (pure functions, no model).

Folding: Unicode NFKC (full-width letters and digits become ASCII, the ideographic space a space, ligatures
their letters), case folding (so `Straße` matches `STRASSE`), and every run of white space, line breaks included,
as one space. A term matches as a whole word where its script separates words with spaces: not inside a longer
word, so `cat` does not match `category`. Scripts written without spaces (Chinese, Japanese kana, Thai, Lao,
Khmer, Myanmar) have no word boundaries to find, so a term in them matches anywhere, and a character of them
next to a term counts as a boundary (`一只cat` matches `cat`)."""

import re
import unicodedata
from pathlib import Path
from typing import Optional

from qimg.errors import UsageError
from qimg.small_files import read_small

MAX_BYTES = 4 * 1024 * 1024  # a list of many thousand terms; anything larger is a mistake
# scripts written without spaces between words: CJK ideographs (and their extensions and compatibility forms),
# kana, Thai, Lao, Khmer, Myanmar
UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
            "\U00020000-\U0003134f")
WORD = rf"[^\W{UNSPACED}]"  # a letter or digit of a script that separates words with spaces


def fold(text: str) -> str:
    """`text` as matching sees it: NFKC, case-folded, white-space runs as one space, trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def parse(text: str) -> list[str]:
    """The folded terms of a word list's text: one a line, blank lines and `#` comment lines skipped."""
    terms = (fold(line) for line in text.splitlines() if not line.strip().startswith("#"))
    return list(dict.fromkeys(t for t in terms if t))  # in order, each once


def pattern(terms: list[str]) -> Optional[re.Pattern]:
    """One regular expression matching any of `terms` (folded) in a folded text, each bounded as the module
    says; None for no terms. Longer terms first, so the match names the longest."""
    if not terms:
        return None
    parts = []
    for term in sorted(terms, key=len, reverse=True):
        left = rf"(?<!{WORD})" if re.match(WORD, term[0]) else ""
        right = rf"(?!{WORD})" if re.match(WORD, term[-1]) else ""
        parts.append(left + re.escape(term) + right)
    return re.compile("|".join(parts))


class Words:
    """A word list read and compiled once: match(text) gives the (folded) term found, or None."""

    def __init__(self, terms: list[str]):
        self.terms = terms
        self._pattern = pattern(terms)

    @classmethod
    def read(cls, path: Path, what: str) -> "Words":
        data = read_small(path, what, MAX_BYTES)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UsageError(f"{what} {path}: byte {e.start} is not UTF-8; save the list as UTF-8") from None
        return cls(parse(text))

    def match(self, text: str) -> Optional[str]:
        if self._pattern is None:
            return None
        found = self._pattern.search(fold(text))
        return found.group(0) if found else None
