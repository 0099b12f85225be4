"""Reports on a search: its trials' results read from MLflow (``results``), the papers'
comparison table and plots (``compare``), and where report files go: the parent run, and the
Optuna study for parameter importances (``publish``).
May import: ``tracking``, ``studies``, ``display``, trainables.
"""
