"""Launchers: run one training job on a laptop or a cluster, chosen by name from a registry.

    from pipeline.train.launchers import make_launcher, options_schema
    make_launcher("local").launch(job, nodes=1, procs_per_node=2)
    make_launcher("kubernetes", image="registry/imagen:0.1").launch(job, nodes=4, procs_per_node=8)
    options_schema("kubernetes")     # the JSON schema of what a trigger form may set for it

A launcher has one method, ``launch(job, nodes, procs_per_node) -> summary`` (:class:`Launcher`),
and lives in its own module with the options it takes, as img2dataset's distributors do:

- ``local`` (:mod:`.local`): ``torchrun`` on this machine; no trigger-form options.
- ``kubernetes`` (:mod:`.kubernetes`): a Kubeflow Trainer ``TrainJob``; its options are
  :class:`~pipeline.train.launchers.kubernetes.KubernetesOptions`.

Each launcher class declares ``OPTION_SCHEMA``: ``{key: JSON schema}`` of the options a trigger
form may set (``launcher_options``). Its constructor may take more (test hooks such as
``api``, ``runner``, ``in_process``), which only Python callers pass: :func:`check_options`
refuses every key outside the chosen launcher's schema, naming the launcher and its keys.

The DAG Param: an Airflow Param's schema is static and cannot depend on the ``launcher``
Param, and the trigger form renders an ``object`` Param as one JSON editor (a ``oneOf`` of
per-launcher objects has no ``type`` to render by, and its errors name no key). So the
``launcher_options`` Param uses :func:`launcher_options_schema`, the union of every launcher's
keys with their JSON schemas (``additionalProperties: false``), its description listing the keys
per launcher (:func:`option_keys`); the task then checks the options against the chosen
launcher's own schema (``pipeline.train.launch.run_stage``) before anything starts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.train.launchers.kubernetes import KubernetesLauncher
from pipeline.train.launchers.local import LocalLauncher

if TYPE_CHECKING:
    from pipeline.train.job import TrainJob


class Launcher(Protocol):
    """Runs one training job to completion and returns the trainer's summary
    (``{"checkpoint", "step", "loss", "run_id", "stage"}``; ``run_id`` may be None)."""

    def launch(self, job: TrainJob, nodes: int, procs_per_node: int) -> dict[str, Any]: ...


LAUNCHERS: dict[str, Callable[..., Launcher]] = {}


def register_launcher(name: str):
    """Class decorator: make a launcher available as ``make_launcher(name, **options)``; its
    ``OPTION_SCHEMA`` (default: none) says which options a trigger form may pass."""
    def wrap(factory):
        LAUNCHERS[name] = factory
        return factory
    return wrap


register_launcher("local")(LocalLauncher)
register_launcher("kubernetes")(KubernetesLauncher)


def launcher_names() -> list[str]:
    return sorted(LAUNCHERS)


def _factory(name: str) -> Callable[..., Launcher]:
    if name not in LAUNCHERS:
        raise ValueError(f"unknown launcher {name!r}; choose one of {', '.join(sorted(LAUNCHERS))}")
    return LAUNCHERS[name]


def make_launcher(name: str, **options: Any) -> Launcher:
    """The launcher called ``name``, built with its ``options`` (see each launcher's doc)."""
    factory = _factory(name)
    try:
        return factory(**options)
    except TypeError as e:
        raise TypeError(f"launcher {name!r} does not take these options: {e}. "
                        f"See the docstring of {factory.__name__}") from None


def option_keys(name: str) -> list[str]:
    """The keys a trigger form may set for launcher ``name``, in its schema's order."""
    return list(getattr(_factory(name), "OPTION_SCHEMA", {}))


def options_schema(name: str) -> dict[str, Any]:
    """The JSON schema of launcher ``name``'s ``launcher_options``."""
    properties = getattr(_factory(name), "OPTION_SCHEMA", {})
    return {"type": "object", "additionalProperties": False, "properties": copy.deepcopy(properties)}


def launcher_options_schema() -> dict[str, Any]:
    """The ``launcher_options`` Param's schema: every launcher's keys (see the module doc).
    Two launchers may share a key only with the same schema."""
    properties: dict[str, Any] = {}
    for name in launcher_names():
        for key, schema in options_schema(name)["properties"].items():
            if properties.setdefault(key, schema) != schema:
                raise ValueError(f"launcher {name!r} declares option {key!r} with another schema than "
                                 "another launcher: give one of them another name")
    return {"type": "object", "additionalProperties": False, "properties": properties}


def check_options(name: str, options: Any) -> dict[str, Any]:
    """``options`` from a trigger form, checked against launcher ``name``'s schema keys (their
    values are checked when the launcher is made): a one-line ValueError naming the launcher
    and the keys it takes. Python-only hooks (``api``, ``runner``...) never pass."""
    if not isinstance(options or {}, dict):
        raise ValueError(f"launcher_options must be an object, got {type(options).__name__}")
    options, allowed = dict(options or {}), option_keys(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "none (it takes no launcher_options)"
        raise ValueError(f"launcher_options: unknown keys {unknown} for the {name!r} launcher; allowed: {takes}")
    return options
