"""MLflow tracking: where runs go, one parent run per search, one child run per trial.

``search_run`` opens a search's parent run and the tracking target; ``trial_runs`` keeps a
trial's child run exactly in step with its record (``MlflowTrialTracker``, picklable, used
on every node); ``retry`` survives tracking-server outages; ``run_names`` names runs by what
varies; ``summary`` writes a search's summary onto its parent run; ``links`` builds links
into MLflow's UI; ``client`` builds every MLflow client (the reports' too); ``tables`` writes
the markdown tables that summaries and reports log.
May import: ``credentials``, ``searchfile``, ``display``, trainables.
"""
