"""The code file of every model `imagen-pipeline register` logs (MLflow "models from code").

MLflow stores a copy of this file with the model and runs it in ``mlflow.pyfunc.load_model``;
no pickled Python object is stored. It only hands MLflow the installed package's
``ImagenPyfunc``, whose ``load_context`` fetches the weights and encoder files the model
references by sha256 (pipeline/release/blobs.py), checks every listed file's hash, and builds the
cascade from the safetensors and config.json. Not meant to be imported: ``set_model`` below is
what MLflow runs it for.
"""

import mlflow

from pipeline.release.registry import ImagenPyfunc

mlflow.models.set_model(ImagenPyfunc())
