"""Running a search on Ray Tune: connect to Ray, build the Tuner, run stages in order, resume.

``rayenv`` prepares the environment before Ray is imported (loopback, authentication);
``tuner`` builds the ``tune.Tuner`` from a search space; ``driver`` runs and resumes a
whole search (``run_search``, ``resume_search``); ``jobs`` sends a search's driver to a
cluster's job server and finds it again by the search's name; ``callbacks`` are the driver-side Tune
callbacks (trials' runs closed, state backed up); ``stage_inputs`` finds what a later stage
starts from; ``status`` reads a search's state without Ray.
May import: ``searchfile``, ``studies``, ``tracking``, ``state``, ``reports``, trainables.
"""
