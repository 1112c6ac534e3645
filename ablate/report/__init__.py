"""Reports: from finished trials to numbers, tables, plots and the published report.

``stats`` (paired tests, intervals, Holm), ``compare`` (a suite's comparison, a search's summary),
``render`` (tables, Markdown, live and headless progress), ``plots`` and ``publish`` (report.md,
report.json and the parent run's summary).
"""
