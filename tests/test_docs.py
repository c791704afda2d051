"""The docs hold together: every relative link of README.md and docs/*.md resolves (to a file, and where it
names an anchor, to a heading of that file), and every `dmqn ...` command line they show names a real command
(its `--help` succeeds) with options that command has. A command line is a line of a fenced shell block or an
inline code span that starts with `dmqn`; `$ ` prompts, `VAR=value` prefixes, `\\` continuations, shell
comments, `&&`/`|`/`;` chains and `torchrun ... -m dmqn_cli` are understood, and placeholders (RUN_ID, <user>,
...) are positional arguments, never checked."""

from __future__ import annotations

import re
import shlex
import unicodedata
from functools import cache
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dmqn_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
_SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SEPARATORS = {"|", "||", "&&", ";", "&", ";;"}
# Commands that run the command after them (with their own options first).
_WRAPPERS = {"time", "/usr/bin/time", "nice", "env", "exec", "command"}


# ---------------------------------------------------------------- reading a Markdown file


def _blocks(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """The file's prose lines [(line number, text)] and its fenced blocks' lines [(line number, language, text)]."""
    prose: list[tuple[int, str]] = []
    fenced: list[tuple[int, str, str]] = []
    fence: str | None = None
    language = ""
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, language = match.group(1), match.group(2).lower()
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip()[len(fence) :]:
            fence = None
        elif fence is not None:
            fenced.append((number, language, line))
        else:
            prose.append((number, line))
    return prose, fenced


def _plain_heading(text: str) -> str:
    """A heading as rendered, the text both slug rules start from: code spans, links and emphasis unwrapped."""
    text = re.sub(r"`+([^`]*)`+", r"\1", text)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"(\*\*|__|\*)(.+?)\1", r"\2", text)
    return text.strip().rstrip("#").strip()


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading (github-slugger): lower case, punctuation dropped, each space a hyphen."""
    text = _plain_heading(heading).lower()
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return text.replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """MkDocs' anchor of a heading (Python-Markdown's toc.slugify): ASCII only, a run of spaces and hyphens one
    hyphen."""
    text = unicodedata.normalize("NFKD", _plain_heading(heading)).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> tuple[set[str], set[str]]:
    """The anchors of a Markdown file's headings, (GitHub's, MkDocs'); a repeated heading numbered as each rule
    numbers it."""
    github: set[str] = set()
    mkdocs: set[str] = set()
    prose, _ = _blocks(path.read_text(encoding="utf-8"))
    for _, line in prose:
        match = re.match(r"^(#{1,6})\s+(.+)$", line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        candidate, n = slug, 0
        while candidate in github:
            n += 1
            candidate = f"{slug}-{n}"
        github.add(candidate)
        slug = mkdocs_slug(match.group(2))
        candidate, n = slug, 0
        while candidate in mkdocs:
            n += 1
            candidate = f"{slug}_{n}"
        mkdocs.add(candidate)
    return github, mkdocs


# ---------------------------------------------------------------- links


def link_problems(path: Path, text: str | None = None) -> list[str]:
    """Each relative link of a Markdown file whose file or heading does not exist, as `file:line: why`.
    A link inside docs/ must resolve under both slug rules (the page is read on GitHub and in the MkDocs site)."""
    text = path.read_text(encoding="utf-8") if text is None else text
    in_site = (ROOT / "docs") in path.parents
    problems = []
    prose, _ = _blocks(text)
    for number, line in prose:
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            target = match.group(1)
            if _SCHEME.match(target) or target.startswith("//"):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}"
            if not resolved.exists():
                problems.append(f"{where}: {target}: no such file")
            elif in_site and not resolved.is_relative_to(ROOT / "docs"):
                problems.append(f"{where}: {target}: outside docs/, a broken link in the site")
            elif anchor and resolved.suffix == ".md":
                github, mkdocs = anchors(resolved)
                if anchor not in github:
                    problems.append(f"{where}: {target}: no heading with GitHub's anchor #{anchor}")
                elif in_site and anchor not in mkdocs:
                    problems.append(f"{where}: {target}: no heading with MkDocs' anchor #{anchor}")
    return problems


def test_every_relative_link_resolves():
    problems = [problem for path in DOC_FILES for problem in link_problems(path)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- command lines


def command_lines(text: str) -> list[tuple[int, str]]:
    """The shell lines of the fenced shell blocks (continuations joined, prompts removed) and the inline code
    spans of the prose that start with `dmqn `, as [(line number, text)]."""
    prose, fenced = _blocks(text)
    lines: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, language, line in fenced:
        if language not in _SHELL_LANGUAGES:
            continue
        if pending is not None:
            start, head = pending
            line, number = head + " " + line.strip(), start
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
            continue
        stripped = line.strip()
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        lines.append((number, stripped))
    for number, line in prose:
        for match in _CODE_SPAN.finditer(line):
            span = match.group(2).strip()
            if span.startswith("dmqn ") or span == "dmqn":
                lines.append((number, span))
    return sorted(lines, key=lambda item: item[0])


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in a fragment: words are still words
        return line.split()


def dmqn_invocations(line: str) -> list[list[str]]:
    """The argument lists of every `dmqn` the line runs (`dmqn`, `python -m dmqn_cli`, `torchrun ... -m dmqn_cli`)."""
    invocations = []
    segment: list[str] = []
    for token in [*_tokens(line), ";"]:
        if token not in _SEPARATORS:
            segment.append(token)
            continue
        words = [word for word in segment if word]
        segment = []
        while words and (_ENV_ASSIGNMENT.match(words[0]) or words[0] in _WRAPPERS):
            wrapper = words.pop(0)
            if wrapper == "nice" and words[:1] == ["-n"]:
                del words[:2]
            while wrapper != "env" and words and words[0].startswith("-") and not _ENV_ASSIGNMENT.match(words[0]):
                words.pop(0)
        if words and words[0] == "dmqn":
            invocations.append(words[1:])
        elif words and Path(words[0]).name in {"python", "python3", "torchrun"}:
            for i in range(len(words) - 1):
                if words[i] == "-m" and words[i + 1] == "dmqn_cli":
                    invocations.append(words[i + 2 :])
                    break
    return invocations


@cache
def _root():
    # Typer builds its commands on its own copy of click (typer._click in recent versions): duck typing, below.
    return typer.main.get_command(app)


@cache
def _help_works(path: tuple[str, ...]) -> str | None:
    result = CliRunner().invoke(app, [*path, "--help"])
    return None if result.exit_code == 0 else f"`dmqn {' '.join(path)} --help` exits {result.exit_code}"


def _option_names(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def invocation_problems(args: list[str]) -> list[str]:
    """Why one `dmqn` argument list does not parse: an unknown sub-command, a failing `--help`, an unknown option."""
    command = _root()
    path: list[str] = []
    rest = list(args)
    while hasattr(command, "commands"):  # a group
        positional = next((word for word in rest if not word.startswith("-")), None)
        # A group's own options come before its sub-command; none of dmqn's take a value.
        if positional is None or any(word.startswith("-") for word in rest[: rest.index(positional)]):
            break
        sub = command.commands.get(positional)
        if sub is None:
            name = " ".join(["dmqn", *path])
            return [f"`{name}` has no sub-command {positional!r} (it has {', '.join(sorted(command.commands))})"]
        command, path = sub, [*path, positional]
        rest = rest[rest.index(positional) + 1 :]
    problem = _help_works(tuple(path))
    if problem:
        return [problem]
    known = _option_names(command)
    problems = []
    for word in rest:
        option = word.strip("[](),").split("=", 1)[0]
        if not option.startswith("-") or option == "-" or re.fullmatch(r"-[\d.]+", option):
            continue
        if option not in known:
            problems.append(f"`dmqn {' '.join(path)}` has no option {option}")
    return problems


def command_problems(text: str, where: str = "") -> list[str]:
    return [
        f"{where}:{number}: {line!r}: {problem}"
        for number, line in command_lines(text)
        for args in dmqn_invocations(line)
        for problem in invocation_problems(args)
    ]


def test_every_dmqn_command_line_parses():
    problems = []
    found = 0
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        found += sum(len(dmqn_invocations(line)) for _, line in command_lines(text))
        problems += command_problems(text, str(path.relative_to(ROOT)))
    assert found > 100, found  # the docs show well over a hundred command lines: the reader finds them
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the checks can fail


def test_the_checks_flag_a_made_up_command_a_made_up_option_and_broken_links(tmp_path):
    text = (
        "Run `dmqn frobnicate --now` or `dmqn runs frob`.\n\n"
        "```bash\n"
        "OMP_NUM_THREADS=1 dmqn train synthetic \\\n"
        "    --model dmqn --no-such-flag 3   # a comment --not-an-option\n"
        "dmqn eval --split valid && dmqn bench x --models all --sedes 3\n"
        "torchrun --nproc-per-node 2 -m dmqn_cli train x --epohcs 2\n"
        "python examples/compare_benches.py a dmqn b --whatever\n"
        "```\n"
    )
    problems = command_problems(text, "doc.md")
    assert len(problems) == 5, problems
    assert "no sub-command 'frobnicate'" in problems[0] and "no sub-command 'frob'" in problems[1]
    assert [p.split("has no option ")[-1] for p in problems[2:]] == ["--no-such-flag", "--sedes", "--epohcs"]
    assert problems[2].startswith("doc.md:4:")  # a continued line is reported where it starts

    (tmp_path / "other.md").write_text("# A heading (`with code`)\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading-with-code) [ok](other.md#twice-1) [ok](#here) ![ok](other.md)\n"
        "[no file](missing.md) [no anchor](other.md#nowhere) [web](https://example.com/x.md) `[code](nope.md)`\n"
        "# Here\n",
        encoding="utf-8",
    )
    assert [p.split(": ", 1)[1] for p in link_problems(page)] == [
        "missing.md: no such file",
        "other.md#nowhere: no heading with GitHub's anchor #nowhere",
    ]


@pytest.mark.parametrize(
    ("heading", "github", "mkdocs"),
    [
        ("Multi-process training (`torchrun`)", "multi-process-training-torchrun", "multi-process-training-torchrun"),
        ("Serving — over HTTP", "serving--over-http", "serving-over-http"),
        ("The `short_len` of [DIN](din.md)", "the-short_len-of-din", "the-short_len-of-din"),
    ],
)
def test_the_two_slug_rules(heading, github, mkdocs):
    assert (github_slug(heading), mkdocs_slug(heading)) == (github, mkdocs)
