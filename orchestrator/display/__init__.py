"""Showing one trial's results: terminal tables and plots, drawn from metric names and values alone.

Used by ``normlab trial`` and by the tracking of a trial's run (its plots as artifacts).
May import: trainables only (and rich, matplotlib).
"""
