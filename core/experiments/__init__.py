"""Experiments over many configurations (``recflow tune``): search space, Optuna study, trials, results.

No Prefect here: ``tasks/tune.py`` and ``flows/tuning_pipeline.py`` wrap these functions.
"""
