"""The embedding engine: the one batched embedding loop (`engine`), embeddings files (`files`), the feature store.

Submodules are imported explicitly (`from guie.embedding.files import read_embeddings`): reading an embeddings file
must not import torch, so this package imports nothing on its own.
"""
