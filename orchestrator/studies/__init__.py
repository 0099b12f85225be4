"""Optuna studies: the searcher Ray Tune runs (``StudySearch``), its sampler, its RDB storage,
and reading a study back (Pareto front, retried trials).
May import: nothing else of orchestrator (Ray Tune's Optuna integration and Optuna itself).
"""
