"""Fixtures of the unit tier."""

from __future__ import annotations

import os
import sys

import pytest

DAGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dags")


def import_dag_common():
    """dags/imagen_common.py, imported as the DAG files import it (the DAGs folder on sys.path)."""
    sys.path.insert(0, DAGS)
    try:
        import imagen_common
    finally:
        sys.path.remove(DAGS)
    return imagen_common


@pytest.fixture(scope="module")
def common():
    return import_dag_common()
