"""Bounded YAML: read a file or a value someone hands normlab without hanging or crashing.

``load_yaml_file`` and ``load_yaml_text`` give what ``yaml.safe_load`` gives for an
ordinary document, and refuse with ``YamlRefused`` (every problem as a key path and a
reason) whatever would hang, exhaust memory or be silently misread:

- a file over ``MAX_BYTES`` (checked before reading) or not a regular file;
- bytes that are not UTF-8 (a UTF-8 BOM is fine), or UTF-16/UTF-32 without a BOM;
  binary files (NUL bytes) and Latin-1 are refused with the byte offset;
- more than ``MAX_EVENTS`` parse events, nesting deeper than ``MAX_DEPTH``, more than
  ``MAX_ALIASES`` aliases, aliases that would expand to more than ``MAX_NODES`` nodes
  (the expanded size of each anchor is counted once, so an alias bomb is measured, never
  expanded), and aliases to a node that contains them;
- duplicate mapping keys (both line numbers) and non-finite floats (``.inf``, ``.nan``).

The limits are checked on one pass over ``yaml.parse``'s events, which is iterative, so
nothing recursive runs before the depth is known. The document is then composed from the
same events and constructed with PyYAML's ``SafeConstructor`` (SafeLoader semantics).
"""

from __future__ import annotations

import codecs
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, Event, MappingStartEvent, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError
from yaml.resolver import Resolver

from trainables.problems import Problem, clip, problem_lines

MAX_BYTES = 1 << 20
MAX_EVENTS = 20_000
MAX_DEPTH = 32
MAX_ALIASES = 100
MAX_NODES = 20_000

_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it: faster
_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_FLOAT = "tag:yaml.org,2002:float"
_MERGE = "tag:yaml.org,2002:merge"
_SAVE_AS_UTF8 = "save the file as UTF-8"


class YamlRefused(ValueError):
    """A YAML source normlab will not read: ``source: key.path: reason`` lines."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source, self.problems = source, problems
        super().__init__(problem_lines(source, problems))


class YamlSyntaxError(YamlRefused):
    """The text is not YAML at all (as opposed to YAML that breaks a limit)."""


# ------------------------------------------------------------------------- bytes to text


def read_bounded(path: str | Path, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, its size checked before reading."""
    source = str(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise YamlRefused(source, [("", "not a regular file")])
        if info.st_size > max_bytes:
            raise YamlRefused(source, [("", f"file is {info.st_size:,} bytes; the limit is {max_bytes:,}")])
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as exc:
        raise YamlRefused(source, [("", f"cannot read: {exc.strerror or exc}")]) from exc
    if len(data) > max_bytes:
        raise YamlRefused(source, [("", f"file is over {max_bytes:,} bytes")])
    return data


def decode(data: bytes, source: str) -> str:
    """UTF-8 (BOM optional) or BOM-marked UTF-16/UTF-32 text; anything else is refused."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding).removeprefix("\ufeff")
            except UnicodeDecodeError as exc:
                raise YamlRefused(
                    source,
                    [
                        (
                            "",
                            f"not valid {encoding.upper().removesuffix('-SIG')} at byte offset {exc.start}; {_SAVE_AS_UTF8}",
                        )
                    ],
                ) from exc
    nul = data.find(b"\0")
    if nul >= 0:
        raise YamlRefused(
            source,
            [
                (
                    "",
                    f"binary data (NUL byte at byte offset {nul}), or UTF-16/32 without a byte-order mark; {_SAVE_AS_UTF8}",
                )
            ],
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = (
            f"not UTF-8 (byte 0x{data[exc.start]:02x} at byte offset {exc.start}, Latin-1 or another legacy encoding?)"
        )
        raise YamlRefused(source, [("", f"{reason}; {_SAVE_AS_UTF8}")]) from exc


# ------------------------------------------------------------------------- limits on events


def _label(value: Any) -> str:
    return clip(str(value), 40)


@dataclass
class _Collection:
    """An open sequence or mapping during the event pass."""

    path: str
    anchor: str | None
    is_mapping: bool
    nodes: int = 1  # expanded size so far, this node included
    children: int = 0  # nodes seen inside (a mapping's keys and values alternate)
    key: str = "?"  # mapping: the label of the key whose value comes next

    def next_child(self, event: Event) -> str:
        """The key path of the node ``event`` starts inside this collection."""
        index, self.children = self.children, self.children + 1
        if not self.is_mapping:
            return f"{self.path}[{index}]"
        if index % 2 == 0:  # a key: problems with it belong to the mapping
            self.key = _label(event.value) if isinstance(event, ScalarEvent) else "?"
            return self.path
        return f"{self.path}.{self.key}" if self.path else self.key


@dataclass
class _EventLimits:
    """One pass over the events: count them, check depth and aliases, without recursion."""

    source: str
    events: list[Event] = field(default_factory=list)
    stack: list[_Collection] = field(default_factory=list)
    anchors: dict[str, int | None] = field(default_factory=dict)  # expanded size; None while open
    aliases: int = 0
    nodes: int = 0  # expanded size of the document so far

    def refuse(self, path: str, event: Event, reason: str) -> YamlRefused:
        return YamlRefused(self.source, [(path, f"{reason} (line {event.start_mark.line + 1})")])

    def add(self, event: Event) -> None:
        self.events.append(event)
        if len(self.events) > MAX_EVENTS:
            raise self.refuse("", event, f"more than {MAX_EVENTS:,} YAML items; far more than any normlab file needs")
        if isinstance(event, CollectionEndEvent):
            done = self.stack.pop()
            if done.anchor is not None:
                self.anchors[done.anchor] = done.nodes
            if self.stack:
                self.stack[-1].nodes += done.nodes
        elif isinstance(event, (ScalarEvent, AliasEvent, CollectionStartEvent)):
            self._node(event, self.stack[-1].next_child(event) if self.stack else "")

    def _node(self, event: Event, path: str) -> None:
        if isinstance(event, CollectionStartEvent):
            if len(self.stack) >= MAX_DEPTH:
                raise self.refuse(path, event, f"nested deeper than {MAX_DEPTH} levels")
            if event.anchor is not None:
                self.anchors[event.anchor] = None
            self.stack.append(_Collection(path, event.anchor, isinstance(event, MappingStartEvent)))
            self.nodes += 1
            return
        size = 1
        if isinstance(event, AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise self.refuse(path, event, f"more than {MAX_ALIASES} aliases")
            size = self.anchors.get(event.anchor, 1)  # undefined: the composer says so
            if size is None:
                raise self.refuse(path, event, f"alias *{_label(event.anchor)} refers to a node that contains it")
        elif event.anchor is not None:
            self.anchors[event.anchor] = 1
        self.nodes += size
        if self.nodes > MAX_NODES:
            raise self.refuse(path, event, f"aliases expand to more than {MAX_NODES:,} values (an alias bomb?)")
        if self.stack:
            self.stack[-1].nodes += size


def _events(text: str, source: str) -> list[Event]:
    """Every parse event of ``text``, refused as soon as one breaks a limit."""
    limits = _EventLimits(source)
    for event in yaml.parse(text, Loader=_Parser):
        limits.add(event)
    return limits.events


# ------------------------------------------------------------------------- compose, check, construct


class _EventLoader(Composer, SafeConstructor, Resolver):
    """PyYAML's SafeLoader minus its parser: composes from events already checked."""

    def __init__(self, events: list[Event]) -> None:
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._events, self._next = events, 0

    def check_event(self, *choices: type) -> bool:
        if self._next >= len(self._events):
            return False
        return not choices or isinstance(self._events[self._next], choices)

    def peek_event(self) -> Event:
        return self._events[self._next]

    def get_event(self) -> Event:
        self._next += 1
        return self._events[self._next - 1]


def _line(node: Node) -> int:
    return node.start_mark.line + 1


@dataclass
class _NodeChecks:
    """Duplicate keys, unreadable scalars and non-finite floats, each with its key path."""

    loader: _EventLoader
    problems: list[tuple[int, str, str]] = field(default_factory=list)  # (line, path, reason)
    seen: set[int] = field(default_factory=set)

    def value(self, node: ScalarNode, path: str) -> tuple[bool, Any]:
        """(readable, value) of a scalar, as SafeLoader constructs it (cached for the final pass)."""
        try:
            value = self.loader.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            reason = getattr(exc, "problem", None) or str(exc).split(";")[0]
            self.problems.append(
                (_line(node), path, f"cannot read {_label(node.value)!r}: {reason} (line {_line(node)})")
            )
            return False, None
        if node.tag == _FLOAT and not math.isfinite(value):
            self.problems.append(
                (_line(node), path, f"non-finite number {_label(node.value)} (line {_line(node)}); use a finite value")
            )
            return False, None
        return True, value

    def check(self, node: Node, path: str) -> None:
        if id(node) in self.seen:  # an alias: its node was checked where its anchor is
            return
        self.seen.add(id(node))
        if isinstance(node, ScalarNode):
            self.value(node, path)
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self.check(item, f"{path}[{i}]")
        elif isinstance(node, MappingNode):
            self.mapping(node, path)

    def mapping(self, node: MappingNode, path: str) -> None:
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            label = "?"
            if key_node.tag == _MERGE:  # ``<<: *defaults``: the merged mapping is checked where it is
                self.check(value_node, path)
                continue
            if isinstance(key_node, ScalarNode):
                readable, key = self.value(key_node, path)
                label = _label(key_node.value)
                if readable and key in first:
                    self.problems.append(
                        (
                            _line(key_node),
                            f"{path}.{label}" if path else label,
                            f"duplicate key (lines {first[key]} and {_line(key_node)})",
                        )
                    )
                elif readable:
                    first[key] = _line(key_node)
            else:
                self.check(key_node, path)
            self.check(value_node, f"{path}.{label}" if path else label)


def _syntax_error(source: str, exc: yaml.YAMLError) -> YamlSyntaxError:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if isinstance(exc, ReaderError):
        problem = f"{exc.reason} (character #x{exc.character:04x} at position {exc.position})"
    else:
        context, problem = getattr(exc, "context", None), getattr(exc, "problem", None)
        problem = f"{context}: {problem}" if context and problem else problem or str(exc).splitlines()[0]
    return YamlSyntaxError(source, [("", f"not valid YAML: {problem}{where}")])


def load_yaml_text(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` within the limits above, or ``YamlRefused`` naming ``source``."""
    try:
        loader = _EventLoader(_events(text, source))
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        raise _syntax_error(source, exc) from exc
    except UnicodeEncodeError as exc:  # undecodable bytes smuggled in as surrogates (command-line arguments)
        raise YamlRefused(source, [("", f"not UTF-8 text: an undecodable byte at character {exc.start}")]) from exc
    if node is None:
        return None
    checks = _NodeChecks(loader)
    checks.check(node, "")
    if checks.problems:
        raise YamlRefused(source, [(path, reason) for _, path, reason in sorted(checks.problems, key=lambda p: p[0])])
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _syntax_error(source, exc) from exc


def load_yaml_file(path: str | Path) -> Any:
    """The YAML document in the file ``path`` (see ``load_yaml_text``); errors name the file."""
    return load_yaml_text(decode(read_bounded(path), str(path)), str(path))
