"""Training: the one training loop over a member axis and what it is made of.

``trainer`` (the loop; it knows neither MLflow nor Optuna), ``models`` (the projection head, user
models, the member axis), ``data`` (paired embeddings, files, splits), ``gradcache``, ``devices``
(device, precision, optimizer kernel, threads), ``stability`` (rules that name an instability) and
``arrays`` (how many compatible runs train as one array). The losses are ``ablate.losses``.
"""
