"""The docs show only what works: every search-file example validates, every ``normlab``
command and flag exists, every relative link resolves.

Documents: ``README.md`` and ``docs/*.md``. What is checked:

- Every fenced ```yaml block. A block with a top-level ``name:`` is a whole search-space
  file and goes to ``load_space`` as it is. Any other block is a fragment of one (just a
  ``grid:``, a ``search:``, a ``stages:`` ...): it is merged into a minimal valid space
  (``name`` + fixed ``dataset: digits``, ``model: cnn``) and validated the same way.
  A file's ``profiles:`` are checked too, each merged over it (``load_every_profile``, as
  ``normlab validate`` does). A first line ``# fragment`` says so explicitly; ``# config-file`` marks a
  ``normlab trial --config`` file (validated as a trial configuration); ``# not-validated``
  leaves a block out (for a deliberately wrong example).
- Every ``normlab <command> ... --flag`` in a fenced block (comments after `` # `` left
  out) or an inline code span: the command is one of ``orchestrator.cli.main``'s, and each
  flag one of that command's options.
- Every relative Markdown link: the file exists and, with ``#anchor``, has that heading.

Each failure names the document and line of the example. Relative paths in examples
(``data_options``' ``if_exists``) resolve from the checkout, as they would for a user
running normlab there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MINIMAL_SPACE = {"name": "docs_example", "fixed": {"dataset": "digits", "model": "cnn"}}

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
_INLINE = re.compile(r"(`+)(.+?)\1", re.S)
_INVOCATION = re.compile(r"(?:^|(?<=[\s/(\[]))normlab[ \t]+(\S+)")
_FLAG = re.compile(r"(?:^|(?<=[\s\[(|]))(--?[A-Za-z][\w-]*)")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_SEGMENT_END = re.compile(r"&&|\|\||;|\s--\s")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Example:
    doc: Path
    line: int  # 1-based line of the example in doc
    text: str
    lang: str = ""

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def fenced_blocks(doc: Path) -> tuple[list[Example], list[tuple[int, str]]]:
    """The fenced blocks of ``doc`` (line = the block's first content line), and the lines
    outside them as (line number, text)."""
    blocks: list[Example] = []
    prose: list[tuple[int, str]] = []
    fence: str | None = None
    lang, start, body = "", 0, []
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence, lang, start, body = match.group(1), match.group(2).lower(), number + 1, []
            else:
                prose.append((number, line))
        elif match and match.group(1).startswith(fence) and not match.group(2) and line.strip() == match.group(1):
            blocks.append(Example(doc, start, "\n".join(body) + "\n", lang))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{doc.relative_to(ROOT)}:{start - 1}: a fenced block is never closed"
    return blocks, prose


def yaml_examples() -> list[Example]:
    return [b for doc in DOCS for b in fenced_blocks(doc)[0] if b.lang in ("yaml", "yml")]


def _code_lines(doc: Path) -> list[tuple[int, str]]:
    """Lines of shell-like code: fenced lines (continuations joined, comments dropped) and
    inline code spans of the prose."""
    blocks, prose = fenced_blocks(doc)
    out: list[tuple[int, str]] = []
    for block in blocks:
        pending, first = "", block.line
        for offset, line in enumerate(block.text.splitlines()):
            if not pending:
                first = block.line + offset
            code = re.split(r"(?:^|\s)#(?:\s|$)", line, maxsplit=1)[0]
            if code.rstrip().endswith("\\"):
                pending += code.rstrip()[:-1] + " "
                continue
            out.append((first, pending + code))
            pending = ""
        if pending:
            out.append((first, pending))
    out += inline_spans(prose)
    return out


def inline_spans(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Inline code spans of the prose, (line where the span starts, its text); a span may
    run over a line break within a paragraph (the break reads as a space)."""
    spans: list[tuple[int, str]] = []
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (0, "")]:
        if line.strip() and (not paragraph or number == paragraph[-1][0] + 1):
            paragraph.append((number, line))
            continue
        text, starts = "", []
        for n, part in paragraph:
            starts.append((len(text), n))
            text += part + "\n"
        for match in _INLINE.finditer(text):
            line_no = max(n for offset, n in starts if offset <= match.start())
            spans.append((line_no, " ".join(match.group(2).split())))
        paragraph = [(number, line)] if line.strip() else []
    return spans


def command_examples() -> list[Example]:
    """Every ``normlab ...`` invocation, from ``normlab`` to the end of its command."""
    found = []
    for doc in DOCS:
        for number, code in _code_lines(doc):
            code = _QUOTED.sub("''", code)
            for match in _INVOCATION.finditer(code):
                rest = code[match.start() :]
                end = _SEGMENT_END.search(rest)
                found.append(Example(doc, number, rest[: end.start()] if end else rest))
    return found


def merged_fragment(fragment: dict[str, Any]) -> dict[str, Any]:
    """A fragment of a search file inside the minimal space (its ``fixed`` keys win)."""
    space = {**MINIMAL_SPACE, **fragment}
    space["fixed"] = {**MINIMAL_SPACE["fixed"], **(fragment.get("fixed") or {})}
    return space


def _ids(examples: list[Example]) -> list[str]:
    return [e.where for e in examples]


YAML_EXAMPLES = yaml_examples()
COMMANDS = command_examples()


def test_docs_exist_and_have_examples():
    names = {doc.relative_to(ROOT).as_posix() for doc in DOCS}
    for needed in (
        "README.md",
        "docs/user-guide.md",
        "docs/search-files.md",
        "docs/cluster.md",
        "docs/failures.md",
        "docs/experiments.md",
        "docs/development.md",
        "docs/design.md",
    ):
        assert needed in names, f"{needed} is missing"
    assert len(YAML_EXAMPLES) >= 5 and len(COMMANDS) >= 20, (len(YAML_EXAMPLES), len(COMMANDS))
    assert any(e.doc.name == "README.md" for e in YAML_EXAMPLES), "README.md shows no search file"


@pytest.mark.parametrize("example", YAML_EXAMPLES, ids=_ids(YAML_EXAMPLES))
def test_yaml_example_validates(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.cli import UsageFailure, build_trial_config
    from orchestrator.searchfile.load import load_every_profile
    from orchestrator.searchfile.space import SpaceError

    first = example.text.lstrip().splitlines()[0].strip() if example.text.strip() else ""
    if first == "# not-validated":
        pytest.skip("marked # not-validated")
    monkeypatch.chdir(ROOT)  # relative paths (data_options' if_exists) as from a checkout
    try:
        data = yaml.safe_load(example.text)
    except yaml.YAMLError as exc:
        pytest.fail(f"{example.where}: not YAML: {exc}")
    assert isinstance(data, dict), (
        f"{example.where}: a search-file example must be a mapping, got {type(data).__name__}"
    )
    path = tmp_path / "example.yaml"
    if first == "# config-file":
        path.write_text(example.text, encoding="utf-8")
        try:
            build_trial_config(path, ())
        except UsageFailure as exc:
            pytest.fail(f"{example.where}: this --config example does not validate:\n{exc}")
        return
    whole = "name" in data and first != "# fragment"
    path.write_text(example.text if whole else yaml.safe_dump(merged_fragment(data), sort_keys=False), encoding="utf-8")
    try:
        _, results = load_every_profile(str(path))  # the file, then each of its profiles
        errors = [str(result) for _, result in results if isinstance(result, SpaceError)]
    except SpaceError as exc:
        errors = [str(exc)]
    if errors:
        kind = "search file" if whole else "search-file fragment (inside a minimal space: name + fixed digits/cnn)"
        pytest.fail(f"{example.where}: this {kind} does not validate:\n" + "\n".join(errors))


def _options(command: click.Command, parent: click.Context) -> set[str]:
    ctx = click.Context(command, info_name=command.name, parent=parent)
    names: set[str] = set()
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


@pytest.mark.parametrize("example", COMMANDS, ids=_ids(COMMANDS))
def test_normlab_command_and_flags_exist(example: Example) -> None:
    from orchestrator.cli import main

    root = click.Context(main, info_name="normlab")
    tokens = example.text.split()
    assert tokens[0] == "normlab", example
    if len(tokens) < 2:
        return
    name = tokens[1].strip("`.,:;)([]")
    if name.startswith("-"):
        command: click.Command = main
        flags_from = 1
        allowed = _options(main, None)  # type: ignore[arg-type]
    else:
        commands = sorted(main.commands)
        assert name in main.commands, (
            f"{example.where}: `normlab {name}` is not a normlab command (commands: {', '.join(commands)})\n  {example.text}"
        )
        command = main.commands[name]
        flags_from = 2
        allowed = _options(command, root)
    for flag in _FLAG.findall(" ".join(tokens[flags_from:])):
        assert flag in allowed, (
            f"{example.where}: `normlab {command.name if command is not main else ''}` has no option {flag} "
            f"(it has: {', '.join(sorted(allowed))})\n  {example.text}"
        )


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    _, prose = fenced_blocks(doc)
    return {_slug(line.lstrip("#")) for _, line in prose if re.match(r"^#{1,6}\s", line)}


LINKS = [
    Example(doc, number, target)
    for doc in DOCS
    for number, line in fenced_blocks(doc)[1]
    for target in _LINK.findall(_INLINE.sub("", line))
    if not re.match(r"^[a-z][a-z0-9+.-]*:", target)
]


@pytest.mark.parametrize("link", LINKS, ids=_ids(LINKS))
def test_relative_link_resolves(link: Example) -> None:
    target, _, anchor = link.text.partition("#")
    path = (link.doc.parent / target).resolve() if target else link.doc
    assert path.exists(), f"{link.where}: link to {link.text}: {path} does not exist"
    if anchor and path.suffix == ".md":
        assert anchor in _anchors(path), (
            f"{link.where}: link to {link.text}: no heading with anchor #{anchor} in {path.name}"
        )
