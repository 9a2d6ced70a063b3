"""Development helpers, not pipeline steps: the synthetic tiny dataset and its loopback server
(``tinydata``), the tiny text encoder (``tinymodels``), and the local MLflow and Airflow
services (``services``) that tests, the smoke test and the demo start.
"""
