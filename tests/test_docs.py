"""The docs follow the code: every command, link, path and name in README.md, docs/*.md and benchmarks/README.md.

Commands are read from fenced code blocks tagged bash, sh, shell or console (in console blocks,
only lines after a `$ ` prompt), from untyped blocks whose first line starts with a command, and
from inline code spans that start with `mlflow run ` or `python -m `. Lines continued with `\\`
are joined, heredoc bodies skipped, `&&`, `|` and `;` split, `<placeholders>` and `# comments`
dropped. Then:

- `mlflow run . [-e ENTRY] -P name=value ...` (also `python -m mlflow run`): ENTRY is an entry
  point of MLproject (`main` without -e), every -P name is one of its parameters, and every
  parameter without a default is given.
- `python -m MODULE [SUBCOMMAND] --flag ...` for a module of this project (pipeline.*,
  experiments.*, benchmarks.*): every --flag is one that the module's argparse parser knows (the
  subcommand's parser where there is one). The parser is taken from the module's `main()` in this
  process, which is stopped when it starts parsing, so nothing runs.

Skipped: names only are checked, not values; python code blocks; every other program (pip, bash
scripts such as setup.sh and benchmarks/gpu_check.sh, sudo, psql, cat, export, openssl, mlflow ui
and mlflow server, optuna-dashboard, pytest and `python -m pytest`, ruff); `mlflow run -e ...`
with an elided entry point.

Links: every relative markdown link and image points to an existing file, and to an existing
heading when it names an anchor (GitHub's heading slugs). Web addresses are not fetched.

Paths and names, in inline code outside code blocks: a path under one of the repository's own
folders (`benchmarks/bench.py`, `tests/`) exists, and a dotted name in a project package
(`pipeline.training.train`, `experiments.worker`) imports. Spans with a placeholder or a glob
(`<run_id>`, `*`) are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
PROJECT_PACKAGES = {"pipeline", "experiments", "benchmarks"}
SEPARATORS = {"&&", "||", "|", ";", "&", "(", ")"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
PLACEHOLDER = re.compile(r"<[^<>\n]*>")
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_PATH = re.compile(r"^[\w.-]+(?:/[\w.-]+)+/?$|^[\w.-]+/$")  # a/b.py, a/b/, a/
PROJECT_NAME = re.compile(r"^(?:pipeline|experiments|benchmarks)(?:\.\w+)+$")


@dataclass(frozen=True)
class Command:
    file: Path
    line: int
    text: str

    def where(self) -> str:
        return f"{shown(self.file)}:{self.line}: {self.text}"


def shown(path: Path) -> str:
    """A path as the failure message names it: from the repository root."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def split_markdown(text: str) -> tuple[list[tuple[str, int, list[str]]], list[tuple[int, str]]]:
    """Fenced blocks as (language, first line number, lines), and the prose lines outside them."""
    blocks, prose, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if block is None and fence:
            block = (fence.group(3).lower(), number + 1, [], len(fence.group(1)), fence.group(2))
        elif block is not None and line.strip().startswith(block[4]) and not line.strip().strip(block[4][0]):
            blocks.append(block[:3])
            block = None
        elif block is not None:
            block[2].append(line[block[3] :] if line[: block[3]].isspace() else line.lstrip())
        else:
            prose.append((number, line))
    return blocks, prose


def looks_like_command(line: str) -> bool:
    return line.lstrip().startswith(("$ ", "mlflow ", "python", ".venv/", "bash ", "pip "))


def shell_lines(language: str, first: int, lines: list[str]) -> list[tuple[int, str]]:
    """The logical command lines of one fenced block, with their line numbers."""
    if language not in SHELL_BLOCKS and not (language == "" and lines and looks_like_command(lines[0])):
        return []
    out, heredoc_end, pending = [], None, None
    for number, line in enumerate(lines, first):
        if heredoc_end is not None:
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        if pending is None:
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            pending = (number, "")
        text = pending[1] + (line.strip() if pending[1] else line.rstrip())
        if text.endswith("\\"):
            pending = (pending[0], text[:-1].rstrip() + " ")
            continue
        if heredoc := HEREDOC.search(text):
            heredoc_end = heredoc.group(1)
            text = text[: heredoc.start()]
        if text.strip():
            out.append((pending[0], text.strip()))
        pending = None
    return out


def commands_in(path: Path) -> list[Command]:
    text = path.read_text()
    blocks, prose = split_markdown(text)
    found = [Command(path, number, line) for block in blocks for number, line in shell_lines(*block)]
    prose_text = "\n".join(line for _, line in prose)
    numbers = [number for number, _ in prose]
    for span in INLINE_CODE.finditer(prose_text):
        code = " ".join(span.group(1).split())
        if code.startswith(("mlflow run ", "python -m ")) or code == "mlflow run":
            found.append(Command(path, numbers[prose_text.count("\n", 0, span.start())], code))
    return sorted(found, key=lambda c: c.line)


def tokenize(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""  # `#` only starts a comment as a word
    return list(lexer)


def simple_commands(line: str) -> list[list[str]]:
    """`a && b | c; d` as [[a], [b], [c], [d]], without redirections, comments or VAR=value prefixes."""
    line = PLACEHOLDER.sub("PLACEHOLDER", line)
    try:
        tokens = tokenize(line)
    except ValueError:  # an apostrophe in a comment: `cmd  # MLflow's store`
        tokens = tokenize(re.sub(r"(^|\s)#.*$", "", line))
    commands, current, skip = [], [], False
    for token in tokens:
        if token.startswith("#"):
            break
        if skip:
            skip = False
        elif token in SEPARATORS:
            commands.append(current)
            current = []
        elif token in {">", ">>", "<", "2>", ">&"}:
            skip = True
        elif not current and re.match(r"^\w+=", token):
            continue
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


@functools.cache
def mlproject() -> dict[str, dict[str, bool]]:
    """Entry point -> {parameter: whether it is required (has no default)}."""
    points = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    return {
        name: {p: not (isinstance(spec, dict) and "default" in spec) for p, spec in (point.get("parameters") or {}).items()}
        for name, point in points.items()
    }


def check_mlflow_run(args: list[str]) -> list[str]:
    """Problems with the arguments after `mlflow run`."""
    entry, params, problems = "main", [], []
    words = iter(args)
    for arg in words:
        option, equals, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if option in ("-e", "--entry-point"):
            entry = value if equals else next(words, "")
        elif option in ("-P", "--param-list"):
            params.append(value if equals else next(words, ""))
    if entry == "...":
        return []
    if entry not in mlproject():
        return [f"MLproject has no entry point {entry!r} (it has: {', '.join(mlproject())})"]
    known = mlproject()[entry]
    names = []
    for param in params:
        name, equals, _ = param.partition("=")
        if not equals:
            problems.append(f"-P {param!r} is not name=value")
        elif name not in known:
            problems.append(f"entry point {entry!r} has no parameter {name!r} (it has: {', '.join(known)})")
        names.append(name)
    missing = [name for name, required in known.items() if required and name not in names]
    problems += [f"entry point {entry!r} needs -P {name}=..." for name in missing]
    return problems


class _Parsing(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _stop(parser, args=None, namespace=None):
    raise _Parsing(parser)


@functools.cache
def parser_help(module: str, subcommand: str = "") -> str:
    """The --help text of a project module's parser (of `subcommand`'s, if it has subcommands)."""
    main = importlib.import_module(module).main
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", _stop):
        try:
            main()
        except _Parsing as caught:
            parser = caught.parser
        else:
            raise AssertionError(f"{module}.main() never parsed its arguments")
    if not subcommand:
        return parser.format_help()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        parser.parse_args([subcommand, "--help"])
    return printed.getvalue() or parser.format_help()


def check_python_module(module: str, args: list[str]) -> list[str]:
    """Problems with `python -m module args`."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return []
    if not (REPO / (module.replace(".", "/") + ".py")).exists():
        return [f"no module {module} in this project"]
    subcommand = args[0] if args and not args[0].startswith("-") else ""
    known = set(re.findall(r"(?<![\w-])(--[a-z0-9][\w-]*)", parser_help(module, subcommand)))
    problems = []
    for arg in args:
        if arg == "--":  # what follows goes to another program
            break
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            command = f"{module} {subcommand}".strip()
            problems.append(f"{command} has no flag {flag} (it has: {', '.join(sorted(known))})")
    return problems


def check_command(command: Command) -> list[str]:
    problems = []
    for words in simple_commands(command.text):
        program = Path(words[0]).name
        if program == "mlflow" and words[1:2] == ["run"]:
            problems += check_mlflow_run(words[2:])
        elif program.startswith("python") and len(words) > 2 and words[1] == "-m":
            if words[2] == "mlflow" and words[3:4] == ["run"]:
                problems += check_mlflow_run(words[4:])
            else:
                problems += check_python_module(words[2], words[3:])
    return [f"{command.where()}\n    {problem}" for problem in problems]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for _, line in split_markdown(path.read_text())[1]:
        if match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
    return {f"{base}-{n}" if n else base for base, count in seen.items() for n in range(count)}


def link_problems(path: Path) -> list[str]:
    problems = []
    for number, line in split_markdown(path.read_text())[1]:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:|^//", target, re.IGNORECASE):
                continue  # a web address or mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{shown(path)}:{number}: link {target}"
            if not linked.exists():
                problems.append(f"{where}\n    no file {shown(linked)}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{where}\n    {linked.name} has no heading with anchor #{anchor}")
    return problems


def name_problem(name: str) -> str | None:
    """Why ``package.module.attribute...`` does not resolve; None if it does, or if ``package.module`` is
    no module of the project (MLflow tags such as ``pipeline.error`` share the prefix; paths catch files)."""
    parts = name.split(".")
    if not (REPO / parts[0] / f"{parts[1]}.py").exists():
        return None
    target = importlib.import_module(".".join(parts[:2]))
    for depth, attribute in enumerate(parts[2:], 2):
        if not hasattr(target, attribute):
            return f"{'.'.join(parts[:depth])} has no {attribute}"
        target = getattr(target, attribute)
    return None


def path_and_name_problems(path: Path) -> list[str]:
    """Inline code in the prose naming a file of this repository or a project name that does not exist."""
    top = {entry.name for entry in REPO.iterdir()}
    problems = []
    for number, line in split_markdown(path.read_text())[1]:
        for span in INLINE_CODE.findall(line):
            where = f"{shown(path)}:{number}: `{span}`"
            if REPO_PATH.match(span) and span.split("/")[0] in top and not (REPO / span).exists():
                problems.append(f"{where}\n    no such file or folder in the repository")
            elif PROJECT_NAME.match(span) and (problem := name_problem(span)):
                problems.append(f"{where}\n    {problem}")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=shown)
def test_every_path_and_project_name_in_inline_code_exists(path):
    problems = path_and_name_problems(path)
    assert not problems, "paths and names in the docs that do not exist:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=shown)
def test_every_command_matches_mlproject_and_the_flags(path):
    problems = [problem for command in commands_in(path) for problem in check_command(command)]
    assert not problems, "commands in the docs that the code does not accept:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=shown)
def test_every_relative_link_and_image_exists(path):
    problems = link_problems(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_readme_has_commands_and_the_docs_exist():
    """Guards the extraction itself: an empty harvest would pass everything above."""
    readme = [c.text for c in commands_in(REPO / "README.md")]
    assert any(c.startswith("bash setup.sh && . .venv/bin/activate && mlflow run .") for c in readme), readme
    assert any("-e tune" in c for c in readme) and any("-e compare" in c for c in readme), readme
    assert len(DOCS) > 1


def test_the_checks_catch_wrong_commands_and_links(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Run `mlflow run . -e tune -P n_trial=3` or:\n\n"
        "```bash\n"
        "mlflow run . -e nope\n"
        "mlflow run . -e evaluate --env-manager local \\\n"
        "  -P batch_size=10   # no model\n"
        "cat > x.ini <<'INI'\n"
        "mlflow run . -P not_checked=1\n"
        "INI\n"
        "python -m pipeline.train --data <run id> --hidden-size 8 --hiden-size 8 && python -m pytest -x\n"
        "python -m benchmarks.bench throughput --device cpu --no-such-flag 1\n"
        "```\n\n"
        "[a](missing.md) [b](#nowhere) [c](#run-it) ![d](https://example.com/x.png)\n\n"
        "`benchmarks/bench.py` `benchmarks/nope.py` `pipeline.training.train` `experiments.tune.nope` `pipeline.error`\n\n"
        "## Run it\n"
    )
    problems = [p for c in commands_in(doc) for p in check_command(c)]
    assert len(problems) == 5, problems
    for expected in (
        "doc.md:1: mlflow run . -e tune -P n_trial=3\n    entry point 'tune' has no parameter 'n_trial'",
        "doc.md:4: mlflow run . -e nope\n    MLproject has no entry point 'nope'",
        "doc.md:5: mlflow run . -e evaluate --env-manager local -P batch_size=10   # no model\n"
        "    entry point 'evaluate' needs -P model=...",
        "pipeline.train has no flag --hiden-size",
        "benchmarks.bench throughput has no flag --no-such-flag",
    ):
        assert any(expected in p for p in problems), (expected, problems)
    problems = link_problems(doc)
    assert len(problems) == 2 and "no file missing.md" in problems[0] and "#nowhere" in problems[1], problems
    problems = path_and_name_problems(doc)
    assert len(problems) == 2 and "benchmarks/nope.py" in problems[0] and "experiments.tune has no nope" in problems[1], problems
