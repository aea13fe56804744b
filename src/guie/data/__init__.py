"""Dataset curation: manifests, importers of published datasets, the multi-dataset builder, image validation,
deduplication and leakage checks, tar shards, the emoji benchmark. (Feeding images to a model is `guie.pipeline`.)"""
