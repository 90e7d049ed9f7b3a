"""The documentation's commands parse and its links resolve (README.md and docs/*.md).

What counts as a command (the convention is also stated in docs/README.md):

* the lines of code blocks: indented by 4 spaces (after a blank line) or fenced with ``` / ~~~
  with no language or one of sh, bash, shell, console (other languages, e.g. python, are code,
  not commands);
* a line ending in ``\\`` continues on the next; ``#`` starts a comment (shell rules, ``shlex``);
* ``&&`` chains are split and each piece is checked; leading ``NAME=value`` environment
  assignments are skipped;
* a line is a command when its first word is one of ``fedms-jax``, ``python``, ``python3``,
  ``pip``, ``apt-get``, ``bash``; any other line (a directory listing, prose) is ignored, but
  every piece of a chain that starts with a command must itself be one;
* usage-synopsis notation: ``[`` / ``]`` around arguments are dropped (the arguments inside are
  checked), a lone ``...`` is dropped, and an all-capitals word (``DIR``, ``OUT``, ``ALPHA``,
  ``KEY`` of ``--config.KEY=VALUE``) is a placeholder, checked for nothing but its form.

What each command must satisfy:

* ``fedms-jax ...`` (and ``python -m fedms_jax.cli ...``): the CLI's own argparse parser
  (``fedms_jax.cli._parser()``) accepts it once the ``--config.KEY=VALUE`` overrides are taken
  out, as ``fedms_jax.cli.main`` does; each override is one ``KEY=VALUE`` argument whose dotted KEY
  is a value of the config schema (``fedms_jax.config.Config().to_dict()``) and whose VALUE parses
  as that key's type (``fedms_jax.config.apply_overrides``); a ``--config FILE.py`` exists in the
  repository, a ``--config NAME`` is a built-in config; for ``run`` and ``plan`` the whole
  config (file + overrides) passes ``fedms_jax.config.validate``, as ``main`` checks it before
  anything starts (skipped where a placeholder stands for a value). Paths given as values
  (``~/.cache/...``, ``/tmp/...``) are plain strings: the file system is not consulted for them.
* ``python SCRIPT ...``: SCRIPT is a file of the repository; ``python SCRIPT --help`` exits 0 (run
  once per script, from the repository root, concurrently) and lists every ``--flag`` the docs
  pass to it, except ``--config.KEY=VALUE`` overrides, which are checked against the schema as
  above. Scripts in ``NO_HELP`` have no ``--help``: their flags must appear in their source.
* ``python -m pytest ...``: the test paths exist.
* ``pip install|download ...``: ``-e PATH[extras]`` names a directory of the repository with a
  pyproject.toml whose ``[project.optional-dependencies]`` defines the extras; every other
  argument that is not an option is a requirement ``packaging.requirements.Requirement`` parses.
* ``apt-get update`` takes no package; ``apt-get install`` takes well-formed Debian package names.
* ``bash SCRIPT ...``: SCRIPT is a file of the repository and ``bash -n`` accepts it.

Links: every ``[text](target)`` (and ``[label]: target``) outside code whose target is relative
(no scheme such as http: or mailto:) resolves, from the markdown file it is in, to a file or
directory inside the repository; a ``#anchor`` into a markdown file (or the file itself) must be
the GitHub id of one of its headings.

Needs no GPU, network or file outside the repository.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND_WORDS = ("fedms-jax", "python", "python3", "pip", "apt-get", "bash")
SHELL_FENCES = ("", "sh", "bash", "shell", "console")
# The exact lines .ci/ greps for (and runs) in README.md.
CI_LINES = (
    "pip install -e . && fedms-jax run",
    "pip install -e '.[test]' torch==2.13.0 && python -m pytest -q tests",
)
# Scripts the docs quote that take no --help (they read sys.argv themselves): why, and what is
# checked instead (their flags must appear in the source). Remove one when it gains a --help.
NO_HELP: dict[str, str] = {}  # script -> why it has no --help (every script has one today)
HELP_TIMEOUT_S = 120
PIP_VALUE_OPTIONS = {
    "-d", "--dest", "-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
    "-f", "--find-links", "-t", "--target", "--platform", "--python-version", "--only-binary", "--no-binary",
    "--implementation", "--abi", "--root", "--prefix", "--src",
}
_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
_DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+:~-]+)?")


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --- extraction ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    file: str  # relative to the repository
    line: int  # 1-based, where the (possibly continued) line starts
    text: str  # the whole logical line
    argv: tuple[str, ...]  # one piece of an && chain, environment assignments removed

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def classify(markdown: str) -> list[tuple[int, str, str]]:
    """(line number, line, kind) of every line: ``prose``; ``fence`` (a fence's own line);
    ``shell`` (inside an indented block, or a fenced one with no language or a shell one);
    ``code`` (inside a fenced block of another language)."""
    out: list[tuple[int, str, str]] = []
    fence: str | None = None  # the opening fence's marker while inside a fenced block
    kind = "shell"  # of the fenced block we are in
    indented = False  # inside an indented block
    previous_blank = True
    for number, line in enumerate(markdown.splitlines(), 1):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence) and stripped.strip(fence[0]) == "":
                fence, previous_blank = None, True
                out.append((number, line, "fence"))
            else:
                out.append((number, line, kind))
            continue
        m = re.match(r"\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)", line)
        if m:
            fence, indented = m.group(1), False
            kind = "shell" if m.group(2).lower() in SHELL_FENCES else "code"
            out.append((number, line, "fence"))
            continue
        if line.startswith(("    ", "\t")) and stripped and (indented or previous_blank):
            indented = True
            out.append((number, line, "shell"))
        else:
            indented = indented and not stripped  # a blank line inside an indented block
            out.append((number, line, "prose"))
        previous_blank = not stripped
    return out


def code_lines(markdown: str) -> list[tuple[int, str]]:
    """(line number, text) of every line of the shell code blocks, continuations joined."""
    out = [(n, line) for n, line, kind in classify(markdown) if kind == "shell" and line.strip()]
    joined: list[tuple[int, str]] = []
    start, parts = None, []
    for number, line in out:
        text = line.strip()
        if text.startswith("$ "):  # a console prompt
            text = text[2:]
        if start is None:
            start = number
        if text.endswith("\\"):
            parts.append(text[:-1].strip())
            continue
        parts.append(text)
        joined.append((start, " ".join(p for p in parts if p)))
        start, parts = None, []
    if parts:
        joined.append((start, " ".join(parts)))
    return joined


def _strip_env(argv: list[str]) -> list[str]:
    i = 0
    while i < len(argv) and _ENV.fullmatch(argv[i]):
        i += 1
    return argv[i:]


def _unsynopsis(tokens: list[str]) -> list[str]:
    """Drops ``[`` / ``]`` around arguments and lone ``...``."""
    out = []
    for t in tokens:
        t = t.lstrip("[")
        while t.endswith("]") and t.count("]") > t.count("["):  # keeps .[test]
            t = t[:-1]
        if t and t != "...":
            out.append(t)
    return out


def commands_in(name: str, markdown: str) -> tuple[list[Command], list[str]]:
    """The commands of one markdown text (``name``: its file), and the problems found while
    splitting them into pieces."""
    commands, problems = [], []
    for number, text in code_lines(markdown):
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError as e:  # an unclosed quote
            if _strip_env(text.split())[:1] in ([w] for w in COMMAND_WORDS):
                problems.append(f"{name}:{number}: {text!r} does not split as shell words: {e}")
            continue
        pieces, piece = [], []
        for t in tokens:
            if t == "&&":
                pieces.append(piece)
                piece = []
            else:
                piece.append(t)
        pieces.append(piece)
        pieces = [_unsynopsis(_strip_env(p)) for p in pieces]
        if not pieces[0] or pieces[0][0] not in COMMAND_WORDS:
            continue  # not a command line
        for p in pieces:
            if not p or p[0] not in COMMAND_WORDS:
                problems.append(f"{name}:{number}: {' '.join(p)!r} in {text!r} is not a command "
                                f"({', '.join(COMMAND_WORDS)})")
                continue
            commands.append(Command(name, number, text, tuple(p)))
    return commands, problems


def _collect() -> tuple[list[Command], list[str]]:
    commands, problems = [], []
    for path in DOC_FILES:
        c, p = commands_in(_rel(path), path.read_text(encoding="utf-8"))
        commands += c
        problems += p
    return commands, problems


COMMANDS, SPLIT_PROBLEMS = _collect()


def _script_of(cmd: Command) -> str | None:
    """The repository script a ``python SCRIPT ...`` command runs, or None."""
    argv = cmd.argv
    if argv[0] in ("python", "python3") and len(argv) > 1 and not argv[1].startswith("-"):
        return argv[1]
    return None


SCRIPTS = sorted({s for c in COMMANDS if (s := _script_of(c)) is not None})


# --- checks --------------------------------------------------------------------------------


def _schema() -> dict:
    from fedms_jax.config import Config

    return Config().to_dict()


def _is_placeholder(text: str) -> bool:
    return bool(_PLACEHOLDER.fullmatch(text))


def _override_problem(item: str, schema: dict) -> str | None:
    """Why ``--config.ITEM`` is not a valid override, or None."""
    if "=" not in item:
        return f"--config.{item} needs a value: one argument --config.KEY=VALUE"
    key, value = item.split("=", 1)
    if _is_placeholder(key):
        return None
    node = schema
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            return f"--config.{key}: {part!r} is not a key of {'.'.join(key.split('.')[:i]) or 'the config'}"
        node = node[part]
    if isinstance(node, dict):
        return f"--config.{key} is a section, not a value"
    if _is_placeholder(value):
        return None
    import ml_collections

    from fedms_jax.config import ConfigError, apply_overrides

    try:
        apply_overrides(ml_collections.ConfigDict(schema), [item])
    except ConfigError as e:
        return f"--config.{item}: {e}"
    return None


def _config_file_problem(value: str) -> str | None:
    """Why ``--config VALUE`` names no config, or None (built-in names and repository files)."""
    if _is_placeholder(value):
        return None
    if value.endswith(".py"):
        return None if (REPO / value).is_file() else f"--config {value}: no such file in the repository"
    import fedms_jax.configs

    builtin = Path(fedms_jax.configs.__file__).parent / f"{value}.py"
    return None if builtin.is_file() else f"--config {value}: not a built-in config"


def _check_overrides_and_config(args: list[str], schema: dict) -> list[str]:
    problems = []
    for i, a in enumerate(args):
        if a.startswith("--config."):
            if p := _override_problem(a[len("--config."):], schema):
                problems.append(p)
        elif a == "--config" and i + 1 < len(args):
            if p := _config_file_problem(args[i + 1]):
                problems.append(p)
        elif a.startswith("--config="):
            if p := _config_file_problem(a.split("=", 1)[1]):
                problems.append(p)
    return problems


def _whole_config_problems(rest: list[str], overrides: list[str]) -> list[str]:
    """Why the config a ``run``/``plan`` command makes is refused (``validate``, as ``cli.main``
    does before anything starts), or []. Skipped when a placeholder stands for a value."""
    from fedms_jax.config import ConfigError, apply_overrides, load_config, validate

    name = "embedded"  # the parser's default
    for i, a in enumerate(rest):
        if a == "--config" and i + 1 < len(rest):
            name = rest[i + 1]
        elif a.startswith("--config="):
            name = a.split("=", 1)[1]
    if _is_placeholder(name) or any(_is_placeholder(part) for o in overrides for part in o.split("=", 1)):
        return []
    try:
        validate(apply_overrides(load_config(name), overrides))
    except ConfigError as e:
        return [f"the config is refused: {e}"]
    return []


def _check_fedms_jax(args: list[str], schema: dict) -> list[str]:
    import contextlib
    import io

    from fedms_jax.cli import _parser

    problems = _check_overrides_and_config(args, schema)
    rest = [a for a in args if not a.startswith("--config.")]  # what cli.main hands argparse
    if not problems and rest[:1] in (["run"], ["plan"]):
        problems += _whole_config_problems(rest, [a[len("--config."):] for a in args if a.startswith("--config.")])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args(rest)
    except SystemExit as e:
        if e.code not in (0, None):
            problems.append(f"fedms-jax's parser refuses {rest}: {err.getvalue().strip().splitlines()[-1:]}")
    return problems


def _check_pytest(args: list[str]) -> list[str]:
    problems = []
    for a in args:
        if a.startswith("-"):
            continue
        target = a.split("::")[0]
        if not (REPO / target).exists():
            problems.append(f"pytest path {target!r} does not exist")
    return problems


def _python_problems(args: list[str], schema: dict) -> list[str]:
    if not args:
        return ["python with no arguments"]
    if args[0] == "-m":
        if len(args) < 2:
            return ["python -m with no module"]
        module, rest = args[1], args[2:]
        if module == "pytest":
            return _check_pytest(rest)
        if module in ("fedms_jax", "fedms_jax.cli"):
            import importlib.util

            if importlib.util.find_spec(module if module != "fedms_jax" else "fedms_jax.__main__") is None:
                return [f"python -m {module}: no such runnable module"]
            return _check_fedms_jax(rest, schema)
        return [f"python -m {module}: not a module these checks know (pytest, fedms_jax.cli)"]
    if args[0] == "-c":
        return []
    script = REPO / args[0]
    try:
        script.resolve().relative_to(REPO)
    except ValueError:
        return [f"script {args[0]!r} is outside the repository"]
    if not script.is_file():
        return [f"script {args[0]!r} does not exist"]
    return _check_overrides_and_config(args[1:], schema)  # flags: test_script_help


def _pip_problems(args: list[str]) -> list[str]:
    from packaging.requirements import InvalidRequirement, Requirement

    if not args or args[0] not in ("install", "download"):
        return [f"pip {args[:1]}: only install and download are quoted"]
    problems, i = [], 1
    while i < len(args):
        a = args[i]
        if a in ("-e", "--editable"):
            if i + 1 >= len(args):
                return problems + [f"pip {a} without a path"]
            problems += _local_project_problems(args[i + 1])
            i += 2
            continue
        if a in PIP_VALUE_OPTIONS:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        if a.startswith((".", "/")):
            problems += _local_project_problems(a)
        else:
            try:
                Requirement(a)
            except InvalidRequirement as e:
                problems.append(f"pip requirement {a!r} does not parse: {e}")
        i += 1
    return problems


def _local_project_problems(spec: str) -> list[str]:
    m = re.fullmatch(r"([^\[\]]+)(?:\[([^\]]*)\])?", spec)
    if not m:
        return [f"pip path {spec!r} is not PATH or PATH[extras]"]
    path, extras = REPO / m.group(1), [e.strip() for e in (m.group(2) or "").split(",") if e.strip()]
    if not (path / "pyproject.toml").is_file():
        return [f"pip path {m.group(1)!r} is not a project of the repository (no pyproject.toml)"]
    defined = tomllib.loads((path / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    return [f"pip extra {e!r} of {spec!r} is not in [project.optional-dependencies] ({sorted(defined)})"
            for e in extras if e not in defined]


def _apt_problems(args: list[str]) -> list[str]:
    if not args or args[0] not in ("update", "install"):
        return [f"apt-get {args[:1]}: only update and install are quoted"]
    packages = [a for a in args[1:] if not a.startswith("-")]
    if args[0] == "update":
        return [f"apt-get update takes no package (got {packages})"] if packages else []
    if not packages:
        return ["apt-get install without a package"]
    return [f"apt-get install: {p!r} is not a Debian package name" for p in packages
            if not _DEBIAN_PACKAGE.fullmatch(p)]


def _bash_problems(args: list[str]) -> list[str]:
    if not args:
        return ["bash with no script"]
    script = REPO / args[0]
    if not script.is_file():
        return [f"bash script {args[0]!r} does not exist"]
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    return [] if r.returncode == 0 else [f"bash -n {args[0]}: {r.stderr.strip()}"]


def command_problems(cmd: Command, schema: dict) -> list[str]:
    word, args = cmd.argv[0], list(cmd.argv[1:])
    if word == "fedms-jax":
        return _check_fedms_jax(args, schema)
    if word in ("python", "python3"):
        return _python_problems(args, schema)
    if word == "pip":
        return _pip_problems(args)
    if word == "apt-get":
        return _apt_problems(args)
    return _bash_problems(args)


# --- links ---------------------------------------------------------------------------------

_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")


def prose(markdown: str) -> list[tuple[int, str]]:
    """The lines outside code blocks, with inline code spans removed."""
    return [(n, re.sub(r"`[^`]*`", "", line)) for n, line, kind in classify(markdown) if kind == "prose"]


def github_anchors(markdown: str) -> set[str]:
    """The ids GitHub gives the ATX headings outside code blocks (``-1``, ``-2`` for repeats):
    lower case, punctuation dropped (a code span keeps its text), spaces to hyphens."""
    seen: dict[str, int] = {}
    out = set()
    for _, line, kind in classify(markdown):
        m = None if kind != "prose" else re.match(r"\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link's text
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def link_problems(path: Path, text: str | None = None) -> list[str]:
    """The broken relative links of markdown file ``path`` (its text, or ``text`` as if it were)."""
    text = path.read_text(encoding="utf-8") if text is None else text
    problems = []
    for number, line in prose(text):
        targets = [m.group(1) for m in _INLINE_LINK.finditer(line)]
        if m := _REFERENCE.match(line):
            targets.append(m.group(1))
        for target in targets:
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:, ...
            where = f"{_rel(path)}:{number}: link {target!r}"
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            try:
                resolved.relative_to(REPO)
            except ValueError:
                problems.append(f"{where} points outside the repository")
                continue
            if not resolved.exists():
                problems.append(f"{where} does not resolve ({_rel(path.parent) or '.'}/{file_part} is missing)")
                continue
            if anchor and resolved.suffix == ".md" and \
                    anchor not in github_anchors(resolved.read_text(encoding="utf-8")):
                problems.append(f"{where}: {resolved.name} has no heading with id {anchor!r}")
    return problems


# --- tests ---------------------------------------------------------------------------------


def test_extraction_convention():
    md = "\n".join([
        "Prose `fedms-jax run --nope` is not a command.",
        "",
        "    fedms-jax run --config.rounds=3 \\",
        "        --workdir DIR   # a comment",
        "    fedms_jax/models/   a layout line, not a command",
        "",
        "```python",
        "python = 3",
        "```",
        "",
        "```bash",
        "X=1 pip install -e '.[test]' && fedms-jax report DIR [--out OUT] [--config.KEY=VALUE ...]",
        "```",
    ])
    lines = code_lines(md)
    assert lines == [
        (3, "fedms-jax run --config.rounds=3 --workdir DIR   # a comment"),
        (5, "fedms_jax/models/   a layout line, not a command"),
        (12, "X=1 pip install -e '.[test]' && fedms-jax report DIR [--out OUT] [--config.KEY=VALUE ...]"),
    ]
    commands, problems = commands_in("x.md", md)
    assert not problems
    assert [(c.line, c.argv) for c in commands] == [
        (3, ("fedms-jax", "run", "--config.rounds=3", "--workdir", "DIR")),
        (12, ("pip", "install", "-e", ".[test]")),
        (12, ("fedms-jax", "report", "DIR", "--out", "OUT", "--config.KEY=VALUE")),
    ]
    assert commands_in("x.md", "    pip install x && echo hi\n")[1]  # every piece must be a command
    assert github_anchors("## A `b_c` (d), e\n## A `b_c` (d), e\n") == {"a-b_c-d-e", "a-b_c-d-e-1"}


def test_checks_catch_mistakes():
    schema = _schema()

    def problems(line: str) -> list[str]:
        commands, split = commands_in("x.md", f"    {line}\n")
        assert commands, line
        return split + [p for c in commands for p in command_problems(c, schema)]

    assert not problems("fedms-jax run --config.rounds=3 --config.stage1_rounds=1 --config.sal.budgets=1,2 --workdir W")
    assert problems("fedms-jax run --config.no_such_key=1")
    assert problems("fedms-jax run --config.sal=1")  # a section
    assert problems("fedms-jax run --config.rounds=three")  # not an int
    assert problems("fedms-jax run --config.rounds 3")  # two arguments
    assert problems("fedms-jax run --config.rounds=3")  # valid alone, but stage1_rounds must be < rounds
    assert problems("fedms-jax run --no-such-flag")
    assert problems("fedms-jax run --config experiments/configs/no_such_config.py")
    assert problems("fedms-jax frobnicate")
    assert problems("python -m pytest -q tests/no_such_test.py")
    assert problems("python experiments/no_such_script.py --out DIR")
    assert problems("pip install -e '.[no_such_extra]'")
    assert problems("pip install 'torch=2'")
    assert problems("apt-get install -y Not_A_Package")
    assert problems("bash experiments/no_such_script.sh")
    tune, ok = "experiments/tune.py", subprocess.CompletedProcess
    usage = "usage: tune.py " + " ".join(f"[{f} X]" for f in _flags_used(tune))
    assert _flags_used(tune) and script_problems(tune, ok([], 0, usage, "")) == []
    assert script_problems(tune, ok([], 0, "usage: tune.py [-h]", ""))  # a flag the help lacks
    assert script_problems(tune, ok([], 2, "", "error"))


def test_link_check_catches_mistakes():
    page = REPO / "docs" / "page.md"  # resolved from docs/, as a page there would be
    good = "[a](../README.md) [b](README.md#fedms_jax-documentation) [`c`](../tests/) [d](https://example.org/x)\n"
    assert link_problems(page, good + "    [not](a link: code)\n") == []
    bad = ["[b](no_such_page.md)", "[c](../README.md#no-such-heading)", "[e](../../outside.md)",
           "[f]: ../no_such_dir/"]
    found = link_problems(page, "\n\n".join(bad) + "\n")
    assert len(found) == len(bad), found


def test_readme_keeps_the_ci_commands():
    lines = {line.strip() for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()}
    for ci in CI_LINES:
        assert ci in lines, f"README.md must hold the line {ci!r} (.ci/ greps for it)"
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) < 150, \
        "README.md is the front page; the manual lives in docs/"


def test_commands_found():
    assert not SPLIT_PROBLEMS, "\n".join(SPLIT_PROBLEMS)
    words = {c.argv[0] for c in COMMANDS}
    assert {"fedms-jax", "python", "pip"} <= words, words
    assert SCRIPTS, "no python script quoted"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where}:{c.argv[0]}" for c in COMMANDS])
def test_command_parses(cmd: Command):
    problems = command_problems(cmd, _schema())
    assert not problems, f"{cmd.where}: {cmd.text}\n  " + "\n  ".join(problems)


def _flags_used(script: str) -> dict[str, str]:
    """Every --flag / -f the docs pass to ``script`` (not --config.KEY=VALUE), with a place."""
    flags: dict[str, str] = {}
    for c in COMMANDS:
        if _script_of(c) != script:
            continue
        for a in c.argv[2:]:
            if a.startswith("-") and not a.startswith("--config.") and not re.fullmatch(r"-\d.*", a):
                flags.setdefault(a.split("=", 1)[0], c.where)
    return flags


def _help(script: str) -> subprocess.CompletedProcess | str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # no accelerator probing for a help text
    try:
        return subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=HELP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"--help took more than {HELP_TIMEOUT_S} s"


def script_problems(script: str, result: subprocess.CompletedProcess | str | None) -> list[str]:
    """What is wrong with the docs' use of ``script``, given its ``--help`` run (None: NO_HELP)."""
    if not (REPO / script).is_file():
        return [f"{script} does not exist"]
    if result is None:  # see NO_HELP: the source must mention every flag
        text, what = (REPO / script).read_text(encoding="utf-8"), "its source"
    elif isinstance(result, str):
        return [f"python {script} --help: {result}"]
    elif result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
        return [f"python {script} --help exits {result.returncode}: " + " | ".join(tail)]
    else:
        text, what = result.stdout, "its --help"
    return [f"{script}: {flag} ({where}) is not in {what}" for flag, where in _flags_used(script).items()
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]


def test_script_help():
    """Every quoted script's ``--help`` works and lists the flags the docs pass it. One test for
    all scripts, their ``--help`` run two at a time (under pytest-xdist a parametrized test per
    script would start every script in every worker)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {s: pool.submit(_help, s) for s in SCRIPTS if s not in NO_HELP and (REPO / s).is_file()}
        problems = [p for s in SCRIPTS for p in script_problems(s, futures[s].result() if s in futures else None)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=[_rel(p) for p in DOC_FILES])
def test_links_resolve(path: Path):
    problems = link_problems(path)
    assert not problems, "\n".join(problems)
