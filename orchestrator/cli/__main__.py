"""``python -m orchestrator.cli``: the ``normlab`` program."""

from orchestrator.cli import entry

entry()
