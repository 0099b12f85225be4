"""MLflow tracking: where runs go, one parent run per search, one child run per trial.

``target`` is where runs go and with which credentials: the ``TrackingTarget`` (the URI
without credentials, the artifact folder), resolved once from ``--tracking-uri`` and carried
as one object to the driver, the tracker, the search record and the reports; the credentials
go through the environment, never into stored state. ``search_run`` opens a search's parent
run; ``trial_runs`` keeps a trial's child run exactly in step with its record
(``MlflowTrialTracker``, picklable, used on every node, carries the target); ``retry``
survives tracking-server outages; ``run_names`` names runs by what varies; ``summary`` writes
a search's summary onto its parent run; ``links`` builds links into MLflow's UI; ``client``
builds every MLflow client from a target (the reports' too); ``tables`` writes the markdown
tables that summaries and reports log.
May import: ``credentials``, ``searchfile``, ``display``, trainables.
"""
