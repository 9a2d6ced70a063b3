"""The release wing: from trained stage weights to a registered, servable model.

``evaluate`` samples, times and scores a stage or a cascade (``metrics`` has the scores),
``registry`` registers and promotes MLflow models (``pyfunc_model`` is their code file),
``loading`` builds a cascade from stored weights without unpickling anything, and ``sample``
writes images from a registered model.
"""
