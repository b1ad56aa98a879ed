"""The local route: torch models served by this machine's GPU (or CPU), micro-batched.

Needs no Celery and no Redis: ``tasks/`` wires it to the lane store. Layout:

- ``config``: the models table (config/models.toml), the device and dtype, chosen once;
- ``packer``: pure packing of inputs into micro-batches (EDF, length buckets, token budget);
- ``backends``: tokenise / forward / postprocess per kind of model;
- ``engine``: the micro-batcher around one model (``Engine.run``, ``Engine.stats``);
- ``registry``: model names to engines, loaded once per process;
- ``errors``: the per-request ``RequestError`` (and ``UnknownModel``) in mixbatch's error tree.

Importing this package imports neither torch nor transformers; the modules above do.
"""
