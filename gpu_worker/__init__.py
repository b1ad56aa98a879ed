"""The local route: torch models served by this machine's GPU (or CPU), micro-batched.

Needs no Celery and no Redis: ``tasks/`` wires it to the lane store. Layout:

- ``config``: the models table (config/models.toml, read without torch), the device and dtype;
- ``packer``: pure packing of inputs into micro-batches (EDF, length buckets, token budget);
- ``backends``: one module per kind of model (embedding, classification, generation) on a
  shared ``base``: tokenise / forward / postprocess;
- ``engine``: the micro-batcher around one model (``Engine.run``, ``Engine.stats``);
- ``registry``: model names to engines, loaded once per process;
- ``errors``: the per-request ``RequestError`` (and ``UnknownModel``) in mixbatch's error tree.

Importing this package, ``config``, ``packer`` or ``errors`` imports neither torch nor
transformers; ``backends``, ``engine`` and ``registry`` do.
"""
