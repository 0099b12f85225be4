"""Optuna studies: the searcher Ray Tune runs (``StudySearch``), its sampler, its RDB storage,
and reading a study back (Pareto front, retried trials).
May import: ``orchestrator.searchfile`` (how a search file's storage URL is opened), besides
Ray Tune's Optuna integration and Optuna itself.
"""
