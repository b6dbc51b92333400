# Brickyard API image (CPU). Models are mounted read-only at run time; nothing is downloaded.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    BRICKYARD_HOME=/data \
    BRICKYARD_EMBEDDING__CACHE_DIR=/opt/brickyard/embeddings

WORKDIR /app
# The CPU build of torch first, so that the pinned torch==2.13.0 is not fetched as a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY registry ./registry
COPY composer ./composer
COPY migrations ./migrations
# Editable install keeps migrations/ next to the package, where Alembic looks for it.
RUN pip install -e . && useradd --create-home --uid 10001 brickyard && mkdir -p /data && chown brickyard /data
# Export the embedding model to ONNX now, so the server neither waits for it nor imports torch.
RUN python -c "from registry.settings import Settings; from registry.search.embed import shared_embedder; \
s = Settings(); shared_embedder(s.embedding.resolved_model_path(), cache_dir=s.embedding_cache_dir).dim"
USER brickyard
EXPOSE 8000
CMD ["sh", "-c", "brickyard db upgrade && brickyard serve --host 0.0.0.0 --port 8000"]
