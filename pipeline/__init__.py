"""The Imagen training pipeline: the steps between a URL list and a registered cascade.

Three wings follow the DAG's phases: ``pipeline.data`` (download, filter, embed, the training
loader), ``pipeline.train`` (the job, the trainer, checkpoints, parallelism, the launchers) and
``pipeline.release`` (evaluate, register, sample). ``pipeline.dev`` holds the tiny synthetic
data, the tiny models and the local services for tests and demos. At the top: ``cli`` (the
``imagen-pipeline`` verbs), ``storage`` (the one way to read, list or write a location, over
``netguard``, the SSRF guard), ``grids`` (image grids for train and release) and ``tracking``
(MLflow). The model itself lives in ``imagen/``.
"""
