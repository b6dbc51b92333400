"""Everything retrieval: from a brick's texts to ranked search hits.

What each module owns (data flows top to bottom):

* `embed` - the `Embedder` protocol and the in-process embedders (onnxruntime by default, torch);
  `torch_model` - the sentence-transformers model run by torch (loading, forward pass, int8);
  `onnx_export` - the one-off export of that model to an ONNX graph;
  `embed_process` - an embedder running in a low-priority child process (for brick texts).
* `lexical` - the hashed lexical views of a text (shape, prefix, word) and their TF-IDF (pure).
* `ranking` - the features of a brick and the score of a query against candidates (pure).
* `index_rows` - writing and reading the index rows of a brick version (vectors, lexical
  vectors, corpus statistics, document frequencies) in the database.
* `index` - candidate generation: pgvector on PostgreSQL, an in-memory index elsewhere.
* `hit_cache` - the bricks of recent search hits, so a repeated search skips the store.

Importing the package imports none of its modules (torch and onnxruntime load only on use).
"""
