"""The safety filter's word lists (jobs/safety_words.py): folded with NFKC and case folding, format characters
dropped, runs of spaces as one (none between two characters of a script without spaces), whole words (runs of
letters, runs of digits) where a script has spaces, anywhere in scripts without them."""

import pytest

from qimg.errors import UsageError
from qimg.jobs.safety_words import Words, fold, parse

LIST = "# a test list\n\nUnsafe Test Token\nbanned\n禁止词\n  # an indented comment\nbanned\n"


@pytest.fixture
def words():
    return Words(parse(LIST))


def test_the_list_skips_comments_blank_lines_and_repeats(words):
    assert words.terms == ["unsafe test token", "banned", "禁止词"]


@pytest.mark.parametrize("prompt, found", [
    ("a BANNED thing", "banned"),  # case
    ("a ｂａｎｎｅｄ thing", "banned"),  # full-width letters
    ("unsafe\u3000test\u3000\u3000token", "unsafe test token"),  # ideographic spaces, a run of them
    ("an unsafe   test\ntoken across a line break", "unsafe test token"),  # spaces and a line break
    ("画一个禁止词的圆", "禁止词"),  # Chinese without spaces
    ("一只banned猫", "banned"),  # a Chinese neighbour is a boundary
    ("ＵＮＳＡＦＥ ＴＥＳＴ ＴＯＫＥＮ", "unsafe test token"),
    ("BANNED.", "banned"),
    ("unbanned and bannedness", None),  # not inside a longer word
    ("禁止 词", "禁止词"),  # a space between two characters of a script without spaces is dropped
    ("画一个禁止\u3000\n词", "禁止词"),
    ("a_banned_photo", "banned"),  # an underscore is a boundary
    ("banned2 and 2banned", "banned"),  # so is a digit next to a letter
    ("b\u200banned", "banned"),  # a zero-width space
    ("ban\u00adned", "banned"),  # a soft hyphen
    ("ban\u200dned and \ufeffbanned", "banned"),  # a zero-width joiner, a byte order mark
    ("bannedly, banneda, bannedé", None),  # letters (and a mark-carrying letter) still continue a word
    ("unsafe_test_token", "unsafe test token"),
    ("a red circle", None),
])
def test_matching(words, prompt, found):
    assert words.match(prompt) == found


def test_folding_is_nfkc_casefold_and_one_space():
    assert fold("  Straße\u3000ＡＢＣ \t\n x ") == "strasse abc x"
    assert fold("c\u200bat 禁止 词 一只 a_cat  \u200b cat") == "cat 禁止词一只 a cat cat"
    assert fold("ﬁne") == "fine"


def test_an_empty_list_matches_nothing():
    assert Words(parse("# nothing\n\n")).match("anything") is None


def test_a_list_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "words.txt"
    path.write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        Words.read(path, "safety word list")
    with pytest.raises(UsageError, match="missing"):
        Words.read(tmp_path / "missing", "safety word list")
