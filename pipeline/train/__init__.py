"""The training wing: one cascade stage, in one process or many, on this machine or a cluster.

``job`` says what a training job is (its options, resolved config and batch plan), ``step`` is
one optimizer step on the device (``perf`` its MFU), ``trainer`` is the loop,
``checkpointing`` saves and resumes it exactly, ``parallel`` wraps the model for DDP/FSDP,
``worker`` is one training process (``python -m pipeline.train``), and ``launch`` starts the
workers through a launcher (local torchrun or a Kubernetes TrainJob); the CLI's ``train`` verb
and the DAGs both go through it. ``torchrun`` builds the torchrun command every launcher runs
(one node or several) and runs several local node agents together.
"""
