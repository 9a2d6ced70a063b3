"""Where the pipeline's messages go: information on stdout, warnings and errors on stderr.

Airflow 3's task supervisor logs every line a task writes to stderr at ERROR level, and a shell
user reads stderr as "something went wrong". So a successful step writes its information
(progress, counts, library INFO lines) on stdout, and only what a user must act on on stderr.

    from pipeline import logs
    logs.setup(verbose=False)     # the CLI: INFO and DEBUG -> stdout, WARNING and above -> stderr
    logs.quiet_progress_bars()    # Hugging Face's tqdm bars (weight loading, shard writing) off,
                                  # MLflow's lines through the root logger, its artifact bars off

Both handlers look up ``sys.stdout`` / ``sys.stderr`` when a record is written, not when they
are made, so a caller that swaps the streams (pytest's capture, Airflow's task runner) gets them.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StreamAtEmit(logging.StreamHandler):
    """A StreamHandler writing to whatever ``sys.<name>`` is when a record comes."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def handlers(level: int = logging.INFO) -> list[logging.Handler]:
    """The two handlers: records below WARNING to stdout, WARNING and above to stderr."""
    out, err = _StreamAtEmit("stdout"), _StreamAtEmit("stderr")
    out.addFilter(_Below(logging.WARNING))
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(logging.Formatter(FORMAT))
    out.setLevel(level)
    return [out, err]


def setup(verbose: bool = False) -> None:
    """Configure the root logger for a command-line process (replaces ``logging.basicConfig``):
    INFO (DEBUG with ``verbose``) on stdout, warnings and errors on stderr, and the Hugging Face
    progress bars off (:func:`quiet_progress_bars`)."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, handlers=handlers(level), force=True)
    quiet_progress_bars()


# MLflow's import gives these loggers a handler of its own on stderr (and stops them propagating);
# the levels are the ones it sets
MLFLOW_LOGGERS = {"mlflow": logging.NOTSET, "sqlalchemy.engine": logging.WARNING, "alembic": logging.WARNING,
                  "huey": logging.WARNING}


def route_mlflow_logs() -> None:
    """MLflow's log lines ("Skip logging GPU metrics", "Validating input example") through the
    root logger's handlers, so INFO is information (stdout; INFO in an Airflow task log), and its
    "Downloading artifacts" bars off. For this process and the ones it starts; a user's
    ``MLFLOW_CONFIGURE_LOGGING=true`` keeps MLflow's own handler."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # read when mlflow is imported
    if os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false").strip().lower() in ("1", "true", "yes", "on"):
        return
    for name, level in MLFLOW_LOGGERS.items():
        logger = logging.getLogger(name)
        if level:
            logger.setLevel(level)
        if "mlflow" in sys.modules:  # imported already: take its handler away
            logger.handlers, logger.propagate = [], True


def quiet_progress_bars() -> None:
    """Turn off the tqdm bars of transformers and huggingface_hub ("Loading weights", "Writing
    model shards"): drawn on stderr, each is ERROR lines in an Airflow task log, and they add
    nothing to our own per-shard lines. For this process and the ones it starts; a user's
    ``HF_HUB_DISABLE_PROGRESS_BARS=0`` keeps them. MLflow's too (:func:`route_mlflow_logs`)."""
    route_mlflow_logs()
    # read when huggingface_hub is imported (transformers asks it)
    if os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
