"""The safety filter's word list (--safety-words FILE, $QIMG_SAFETY_WORDS): one word or phrase a line, `#` comment
lines, any language; matched against a prompt after both are folded the same way (pure functions, no model).

Folding: Unicode NFKC (full-width letters and digits become ASCII, the ideographic space a space, ligatures
their letters), case folding (so `Straße` matches `STRASSE`), invisible format characters dropped (zero-width
spaces and joiners, soft hyphens: `c\u200bat` is `cat`), an underscore as a space (`a_cat_photo` is `a cat
photo`, as tags write it), every run of white space, line breaks included, as one space, and a space between
two characters of a script written without spaces dropped (`禁止 词` is `禁止词`).

Words: in scripts that separate words with spaces a word is a run of letters (with their marks) or a run of
digits, so a term matches only as a whole word (`cat` does not match `category`) and anything else is a
boundary, a digit next to a letter too (`cat2` matches `cat`). Scripts written without
spaces (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar) have no word boundaries to find, so a term in them
matches anywhere, and a character of them next to a term counts as a boundary (`一只cat` matches `cat`)."""

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
_UNSPACED = re.compile(f"[{UNSPACED}]")
_UNSPACED_GAP = re.compile(f"(?<=[{UNSPACED}]) (?=[{UNSPACED}])")


class _Classes(dict):
    """A character's part in a word of a spaced script: "L" a letter or mark, "D" a digit, None anything else
    (a space, punctuation, a character of an unspaced script); looked up once per character."""

    def __missing__(self, char: str) -> Optional[str]:
        kind = unicodedata.category(char)[0]
        found = None if _UNSPACED.match(char) else "L" if kind in "LM" else "D" if kind == "N" else None
        self[char] = found
        return found


_CLASS = _Classes()


def fold(text: str) -> str:
    """`text` as matching sees it: NFKC, case-folded, format characters dropped, underscores and white-space runs
    as one space, spaces inside unspaced scripts dropped, trimmed."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().replace("_", " ").split())
    if not text.isprintable():  # only then can it hold a format character (category Cf)
        text = " ".join("".join(c for c in text if unicodedata.category(c) != "Cf").split())
    return _UNSPACED_GAP.sub("", text)


def parse(text: str) -> list[str]:
    """The folded terms of a word list's text: one a line, blank lines and `#` comment lines skipped."""
    terms = (fold(line) for line in text.splitlines() if not line.strip().startswith("#"))
    return list(dict.fromkeys(t for t in terms if t))  # in order, each once


def trie(terms: list[str]) -> dict:
    """The terms as a character trie: nested dicts, a complete term stored under the key "" (no character is
    empty), so matching costs the same for ten terms or ten thousand."""
    root: dict = {}
    for term in terms:
        node = root
        for char in term:
            node = node.setdefault(char, {})
        node[""] = term
    return root


def find(root: dict, text: str) -> Optional[str]:
    """The first term of the trie in a folded `text`, the longest at its place, bounded as the module says: a
    term that begins (ends) with a letter or digit of a spaced script needs no more of its kind before (after)
    it."""
    kinds = list(map(_CLASS.__getitem__, text))
    last = len(text) - 1
    for i in range(len(text)):
        if i and kinds[i] is not None and kinds[i] == kinds[i - 1]:  # inside a word: no term starts here
            continue
        node, found = root, None
        for j in range(i, len(text)):
            node = node.get(text[j])
            if node is None:
                break
            if "" in node and (j == last or kinds[j] is None or kinds[j] != kinds[j + 1]):
                found = node[""]
        if found is not None:
            return found
    return None


class Words:
    """A word list read and compiled once: match(text) gives the (folded) term found, or None."""

    def __init__(self, terms: list[str]):
        self.terms = terms
        self._trie = trie(terms)

    @classmethod
    def read(cls, path: Path, what: str) -> "Words":
        data = read_small(path, what, MAX_BYTES)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UsageError(f"{what} {path}: byte {e.start} is not UTF-8; save the list as UTF-8") from None
        return cls(parse(text))

    def match(self, text: str) -> Optional[str]:
        return find(self._trie, fold(text))
