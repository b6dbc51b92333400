# Brickyard API image (CPU). Models are mounted read-only at run time; nothing is downloaded.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    BRICKYARD_HOME=/data

WORKDIR /app
# The CPU build of torch first, so that the pinned torch==2.13.0 is not fetched as a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY registry ./registry
COPY composer ./composer
COPY migrations ./migrations
# Editable install keeps migrations/ next to the package, where Alembic looks for it.
RUN pip install -e . && useradd --create-home --uid 10001 brickyard && mkdir -p /data && chown brickyard /data
USER brickyard
EXPOSE 8000
CMD ["sh", "-c", "brickyard db upgrade && brickyard serve --host 0.0.0.0 --port 8000"]
