"""Where rows and bytes live: SQL stores returning domain objects, blob stores (local and S3-compatible),
base models and composition outputs in object storage, and the roots base models may be read from."""
