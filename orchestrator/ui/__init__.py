"""normlab's MLflow UI app (``server``): MLflow's own server plus normlab's opening page.
May import: nothing else of orchestrator (it is loaded by ``mlflow server`` as an app plugin).
"""
