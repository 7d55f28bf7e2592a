"""`generate --prompts FILE`: the file's entries, read and checked whole before any model loads.

A text file holds one prompt per line (blank lines skipped); a `.jsonl` file one JSON string or object per
line; a `.yaml`/`.yml` file a list of strings or mappings. An object or mapping gives `prompt` and may give
`seed`, `size` (WxH) and `negative_prompt`. Entry n writes `<n>-<slug>.png`: n is the line number (the
position in a YAML list), so an entry keeps its output name when others are added after it."""

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qimg.errors import UsageError
from qimg.jobs import names
from qimg.option_values import parse_size
from qimg.small_files import parse_json, read_small

MAX_BYTES = 64 * 1024 * 1024  # a million prompts fit; a path to /dev/zero cannot exhaust memory
KEYS = ("prompt", "seed", "size", "negative_prompt")
SLUG_CHARS = 40


@dataclass(frozen=True)
class Entry:
    n: int  # line number (text, JSONL) or position (YAML): the output's number
    where: str  # how messages name it: "line 3", "entry 3 (line 7)"
    prompt: str
    seed: Optional[int] = None
    size: Optional[tuple[int, int]] = None
    negative_prompt: Optional[str] = None

    @property
    def name(self) -> str:
        """The output's file name, `<n>-<slug>.png` (names.prompt_output)."""
        return names.prompt_output(self.n, slug(self.prompt))


def slug(text: str) -> str:
    """The prompt's first words, lower case, joined by '-': letters and digits of any script only, at most
    SLUG_CHARS characters, cut at a word."""
    words = re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", text).lower())
    out = ""
    for word in words:
        if len(out) + len(word) + bool(out) > SLUG_CHARS:
            break
        out += f"-{word}" if out else word
    return out or "".join(words)[:SLUG_CHARS]


def read(path: Path) -> list[Entry]:
    """The entries of a prompts file; the first problem is one UsageError naming the file and line, with how
    many other lines are bad too, so a large file is fixed in one pass."""
    data = read_small(path, "--prompts", MAX_BYTES, "; give a text, .jsonl or .yaml file", "; split it")
    if path.suffix.lower() in (".yaml", ".yml"):
        entries, problems = _yaml_entries(path, data)
    else:
        entries, problems = _line_entries(path, data, path.suffix.lower() == ".jsonl")
    if problems:
        others = [problem.split(":")[0] for problem in problems[1:]]  # "line 7", "entry 3 (line 9)"
        more = f" (and {len(others)} more: {', '.join(others[:5])}{'...' if len(others) > 5 else ''})" if others else ""
        raise UsageError(f"--prompts {path} {problems[0]}{more}")
    if not entries:
        raise UsageError(f"--prompts {path} holds no prompts")
    return entries


def _line_entries(path: Path, data: bytes, jsonl: bool):
    entries, problems = [], []
    for n, raw in enumerate(data.splitlines(), 1):
        where = f"line {n}"
        try:
            text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            if not text.strip():
                continue
            value = parse_json(text, where, unique=True) if jsonl else text.strip()
            entries.append(entry(n, where, value))
        except UnicodeDecodeError:
            problems.append(f"{where}: not UTF-8 text")
        except UsageError as e:
            problems.append(str(e))
    return entries, problems


def _yaml_entries(path: Path, data: bytes):
    import yaml

    try:
        loader = yaml.SafeLoader(data)
        try:
            node = loader.get_single_node()
            if not isinstance(node, yaml.SequenceNode):
                raise UsageError(f"--prompts {path}: expected a YAML list of prompts (- a red cat)")
            entries, problems = [], []
            for n, item in enumerate(node.value, 1):
                where = f"entry {n} (line {item.start_mark.line + 1})"
                try:
                    if isinstance(item, yaml.MappingNode):
                        keys = [k.value for k, _ in item.value]
                        twice = sorted({k for k in keys if keys.count(k) > 1})
                        if twice:
                            raise UsageError(f"{where}: gives {twice[0]!r} twice")
                    entries.append(entry(n, where, loader.construct_object(item, deep=True)))
                except UsageError as e:
                    problems.append(str(e))
                except (ValueError, yaml.YAMLError) as e:  # a scalar YAML cannot build (an integer of 5000 digits)
                    problems.append(f"{where}: holds a value that cannot be read ({str(e).splitlines()[0][:80]})")
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"--prompts {path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}: "
                         f"{problem}") from None
    except RecursionError:
        raise UsageError(f"--prompts {path}: nested too deeply") from None
    return entries, problems


def entry(n: int, where: str, value) -> Entry:
    """One entry from a line's text or a parsed value (a string, or a mapping of KEYS)."""
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected a prompt or a mapping with prompt, seed, size, negative_prompt; "
                         f"got {type(value).__name__}")
    unknown = [k for k in value if k not in KEYS]
    if unknown:
        raise UsageError(f"{where}: unknown key {str(unknown[0])!r} (known: {', '.join(KEYS)})")
    prompt, seed, size, negative = (value.get(k) for k in KEYS)
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError(f"{where}: needs a prompt (non-empty text)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise UsageError(f"{where}: seed {seed!r} is not a whole number from 0 to 2^63-1")
    if size is not None:
        size = parse_size(size, f"{where}: size") if isinstance(size, str) else _bad_size(where, size)
    if negative is not None and not isinstance(negative, str):
        raise UsageError(f"{where}: negative_prompt must be text")
    for text in (prompt, negative or ""):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{where}: text that is not valid Unicode (a lone surrogate escape)") from None
    return Entry(n, where, prompt, seed, size, negative)


def _bad_size(where: str, size) -> None:
    raise UsageError(f"{where}: size {size!r} is not WIDTHxHEIGHT text, e.g. 1024x768")
