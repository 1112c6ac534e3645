"""The study: what its trials are and how they are run, recorded and resumed.

``designs`` (suites and searches behind one interface), ``space`` and ``sampling`` (a search's
parameters and its per-trial seeded sampler), ``studyfiles`` (study files, ``--set``, ``--epochs``),
``studies`` (the Optuna storage and the trial queue), ``records`` (what crosses processes),
``worker`` (the one worker loop), ``launch`` (starting workers) and ``session`` (one command's
study, stores and MLflow parent run).
"""
