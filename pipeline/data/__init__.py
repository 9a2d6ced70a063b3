"""The data wing: URL list -> raw WebDataset shards -> filtered shards -> caption embeddings,
and the loader that feeds them to the trainer.

``download`` runs img2dataset behind ``fetch_guard`` (img2dataset under ``pipeline.netguard``,
the SSRF guard every remote read goes through), ``url_list`` counts a URL list for the planner,
``images`` decodes every image mode to 8-bit RGB, ``shards`` owns the WebDataset shard format
(every tar is read and written through it), ``filters`` with ``filter_registry``, ``dedup`` and
``reshard`` rejects and reshards, ``split`` holds out the validation split (and names every
shard), ``embed`` runs the frozen text encoder once per shard into the Parquet format
``embeddings`` owns, and ``loader`` joins shards and embeddings into training and validation
batches (``batch``, in the order ``order`` makes, cropped by ``crops``).
"""
