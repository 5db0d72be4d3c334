"""Online measurement: A/B reports from the serving log, drift against a version's training profile.

Plain typed Python, no Prefect (``flows/ab_report.py`` composes it): ``profile`` (what a version
was trained on), ``outcomes`` (request log + attempts/events -> per-learner sums), ``ab_stats``
(per-learner confidence intervals, arm differences, sample-ratio mismatch), ``drift`` (serving
traffic vs the profile), ``report`` (JSON, markdown, plot, notification text) and ``simulate``
(simulated learners for tests and demos).
"""
