"""The retry pass's defaults (:mod:`pipeline.data.retry`), apart from the pass so that the DAG files
can read them at parse time (this module imports only the standard library).

    from pipeline.data.retry_config import RetryConfig
    RetryConfig().attempts        # 2 retries of the transient failures after a download

``DownloadConfig``'s ``retry_attempts`` / ``retry_base_delay`` / ``retry_max_delay`` (and so the
CLI's ``--retry-attempts`` ...) and the DAGs' ``retry_attempts`` Param take their defaults from here.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    """How hard the retry pass tries: ``attempts`` passes over the transient failures, the k-th
    after ``base_delay * 2**(k-1)`` seconds (at most ``max_delay``), with jitter. Two passes 2 s
    and 4 s apart get past a brief overload or a restart without keeping a worker for minutes."""

    attempts: int = 2
    base_delay: float = 2.0
    max_delay: float = 60.0
