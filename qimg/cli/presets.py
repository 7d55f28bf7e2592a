"""Presets: YAML files holding options of a command, read strictly and safely.

Precedence is click's, in one place (`apply`): a preset fills the command's default map, so what the command
line (or an environment variable) gives wins, and the preset wins over the command's own defaults. The same
checks serve chain files (`check_options`): every key must be an option of the command, with a value of the
option's type and range. Only `yaml.safe_load` reads YAML, so a file can hold data but never run code.
"""

from pathlib import Path
from typing import Any, Literal, Optional, get_origin

import typer

from qimg.errors import UsageError
from qimg.option_values import preset_is_file
from qimg.small_files import read_small

MAX_BYTES = 256 * 1024  # presets and chains are a few lines; anything larger is a mistake or an attack
# a preset cannot pull in another, aim every run at one output, preview or mask file, nor let runs replace files
# unasked; the user's to choose, per run (and --no-worker is decided before any preset is read)
NOT_IN_PRESETS = {"preset", "out", "overwrite", "cache_dir", "cache_size", "no_cache", "no_worker", "preview",
                  "save_mask", "prompts", "shard", "ray", "cfg_parallel", "ulysses", "tp"}  # its batch, part, where
# it runs (seen before the worker; the ranks are torchrun's launch)
EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "text", Path: "a file path"}


def bundled_folder() -> Path:
    """The bundled presets: package data when installed (pyproject maps the top-level presets/ into
    qimg/presets), the checkout's presets/ when running from source; the files exist once, in presets/."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "presets"
    return installed if installed.is_dir() else package.parent / "presets"


def bundled() -> dict[str, Path]:
    folder = bundled_folder()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def find(name: str) -> Path:
    """A preset by bundled name (`fast`) or by path (anything with a `/` or a .yaml/.yml suffix)."""
    if preset_is_file(name):
        return Path(name)
    presets = bundled()
    if name not in presets:
        raise UsageError(f"--preset {name}: no such preset (bundled: {', '.join(presets) or 'none'}; "
                         f"or give a path to a .yaml file)")
    return presets[name]


def read_yaml(path: Path, what: str) -> dict:
    """A YAML file whose top level is a mapping; any problem is one UsageError line naming the file."""
    import yaml

    data = read_small(path, what, MAX_BYTES)
    try:
        loader = yaml.SafeLoader(data)
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_nodes(loader, node)
            content = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{what} {path}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise UsageError(f"{what} {path}: nested too deeply") from None
    except ValueError as e:  # a scalar YAML cannot build: an integer of over 4300 digits, a date out of range
        raise UsageError(f"{what} {path}: holds a value that cannot be read ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(content, dict):
        kind = "empty" if content is None else f"a {type(content).__name__}"
        raise UsageError(f"{what} {path} is {kind}; expected a mapping of option: value")
    return content


def _check_nodes(loader, root) -> None:
    """Refuse, before anything is built from them, what safe_load would take silently or fail on later: a
    mapping that gives one key twice (YAML would keep the last), and text no UTF-8 can hold (a lone surrogate
    written as a \\ud800 escape). Merge keys (`<<: *defaults`) stay allowed: a key given beside them wins.
    Each node is visited once, so aliases cannot make the walk blow up."""
    from yaml import MappingNode, ScalarNode, SequenceNode
    from yaml.constructor import ConstructorError

    seen, todo = set(), [(root, ())]
    while todo:
        node, where = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, ScalarNode):
            try:
                node.value.encode("utf-8")
            except UnicodeEncodeError:
                raise ConstructorError(None, None, f"text that is not valid Unicode (a lone surrogate escape)"
                                       f"{_at(where)}", node.start_mark) from None
        elif isinstance(node, SequenceNode):
            parent = where[-1] if where else None
            todo += [(item, (*where, f"edit {i}" if parent == "edits" else f"item {i}"))
                     for i, item in enumerate(node.value, 1)]
        elif isinstance(node, MappingNode):
            keys = set()
            for key_node, value_node in node.value:
                todo.append((key_node, where))
                if key_node.tag == "tag:yaml.org,2002:merge":
                    todo.append((value_node, where))
                    continue
                key = loader.construct_object(key_node, deep=True) if isinstance(key_node, ScalarNode) else id(key_node)
                if key in keys:
                    raise ConstructorError(None, None, f"key {str(key)[:40]!r} is given twice{_at(where)}",
                                           key_node.start_mark)
                keys.add(key)
                todo.append((value_node, (*where, str(key)[:40])))


def _at(where: tuple) -> str:
    return f" (in {' > '.join(where)})" if where else ""


def option_params(command, exclude=frozenset()) -> dict[str, Any]:
    """The command's options by key as written in a file: the long option name with `_` for `-`."""
    keys = {}
    for param in command.params:
        if param.param_type_name != "option" or param.name in exclude:
            continue
        longest = max(param.opts, key=len).lstrip("-")
        keys[longest.replace("-", "_")] = param
    return keys


def check_options(ctx, command, mapping: dict, where: str, exclude=frozenset()) -> dict[str, Any]:
    """Mapping of option keys (`-` or `_`) to values, checked against the command's options: returns
    {parameter name: value converted and range-checked as the command line would}."""
    params = option_params(command, exclude)
    allowed = ", ".join(sorted(params))
    values = {}
    for key, value in mapping.items():
        name = key.replace("-", "_") if isinstance(key, str) else None
        if name not in params:
            raise UsageError(f"{where}: unknown key {str(key)[:40]!r}; allowed: {allowed}")
        param = params[name]
        if param.name in values:
            raise UsageError(f"{where}: {key} is given twice (with - and with _)")
        values[param.name] = _convert(ctx, param, key, value, where)
    return values


def _convert(ctx, param, key: str, value, where: str):
    from typer._click.exceptions import BadParameter

    annotation = param.type_descriptor.annotation
    annotation = str if get_origin(annotation) is Literal else annotation  # a choice: text, checked by coerce
    base = str if param.multiple else annotation
    items = [value] if param.multiple and isinstance(value, str) else value
    if any(isinstance(v, int) and abs(v) >= 10**30 for v in (items if isinstance(items, list) else [items])):
        raise UsageError(f"{where}: {key} is a number too large for any option")  # YAML reads 0x... of any length
    ok = isinstance(items, list) and all(_is_a(v, base) for v in items) if param.multiple else _is_a(value, base)
    if not ok:
        expected = f"{EXPECTED[base]} or a list of them" if param.multiple else EXPECTED[annotation]
        hint = " (quote it: YAML reads bare on/off/yes/no as true/false)" if isinstance(value, bool) else ""
        raise UsageError(f"{where}: {key} must be {expected}, not {describe(value)}{hint}")
    try:
        return param.get_runtime_param().coerce(items, param=param, ctx=ctx)
    except BadParameter as e:
        raise UsageError(f"{where}: {key}: {parser_message(e.message)} (got {describe(value)})") from None


def parser_message(text: str) -> str:
    """A message of Typer's parser without the validation library's prefix (`Value error, 'x' is not one of...`)."""
    return text.replace("Value error, ", "")


def _is_a(value, annotation) -> bool:
    if isinstance(value, bool) or annotation is bool:
        return isinstance(value, bool) and annotation is bool
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, str if annotation is Path else annotation)


def describe(value) -> str:
    """A value for an error message: short even for a huge or self-referencing structure."""
    if isinstance(value, (bool, int, float)) or value is None:
        return "nothing" if value is None else repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    return f"a {type(value).__name__}"


def fitting_commands(group, options: dict) -> list[str]:
    """The commands of the app that take every key of a preset (for `qimg presets`)."""
    keys = {str(k).replace("-", "_") for k in options}
    return [name for name, command in group.commands.items()
            if any(p.name == "preset" for p in command.params)
            and keys <= option_params(command, NOT_IN_PRESETS).keys()]


def apply(ctx: typer.Context, value: Optional[str]) -> Optional[str]:
    """The eager --preset callback: runs before the other options are read, so they take the preset's
    values as defaults. Returns the name to record in the output's metadata."""
    if not value:
        return value
    from qimg.weights.lora import relative_to

    path = find(value)
    ctx.default_map = check_options(ctx, ctx.command, read_yaml(path, "preset"), f"preset {path}", NOT_IN_PRESETS)
    if ctx.default_map.get("lora"):  # a preset's LoRA files are found beside it
        ctx.default_map["lora"] = [relative_to(path.parent, text) for text in ctx.default_map["lora"]]
    for part in ("transformer", "text_encoder", "vae", "vision", "safety_words"):  # a file the preset names sits
        if ctx.default_map.get(part) is not None:  # beside it (an absolute path stays)
            ctx.default_map[part] = path.parent / ctx.default_map[part]
    return value
