"""The search-file language: the schema of a search-space file, loading and validation.

``space`` holds the models (``SearchSpace`` and its sections) and what can be derived from a
space alone (grid combinations, stages as one-stage spaces); ``stages`` checks a chain of
stages; ``profiles`` merges a partial file over a file (a profile, or the command line's
overrides); ``load`` reads a file (built-in name or path), applies ``data_options``, a
profile and command line overrides, validates, and reports every problem at once (``SpaceError``).
May import: trainables only. Everything else in orchestrator may import it.
"""
