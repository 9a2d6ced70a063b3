"""The data wing: URL list -> raw WebDataset shards -> filtered shards -> caption embeddings,
and the loader that feeds them to the trainer.

``download`` runs img2dataset behind ``fetch_guard`` (img2dataset under ``pipeline.netguard``,
the SSRF guard every remote read goes through), ``url_list`` counts a URL list for the planner,
``images`` decodes every image mode to 8-bit RGB, ``filters`` with ``filter_registry`` and
``dedup`` rejects and reshards, ``split`` holds out the validation split (and names every
shard), ``embed`` runs the frozen text encoder once per shard, and ``loader`` joins shards and
embeddings into training and validation batches (``batch``).
"""
