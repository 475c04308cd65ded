# syntax=docker/dockerfile:1
# One image for web, workers, beat and migrations. TORCH picks the PyTorch build:
#   docker build --build-arg TORCH=cpu  -t recsys:cpu .    # web, beat, migrations, CPU workers
#   docker build --build-arg TORCH=cuda -t recsys:cuda .   # GPU workers (CUDA wheels from PyPI)
# docker-compose.yml builds both. tests/test_deploy.py checks the properties stated here.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: a virtual environment with torch first (so nothing pulls another build), then recsys
FROM ${PYTHON_IMAGE} AS build
ARG TORCH=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN case "$TORCH" in \
      cpu) pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *) echo "TORCH must be cpu or cuda, not '$TORCH'" >&2; exit 1 ;; \
    esac
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY recsys ./recsys
COPY worker ./worker
COPY web ./web
COPY migrations ./migrations
COPY sql ./sql
COPY data ./data
# editable: migrations and sql/ are found next to the package, in /app
RUN pip install -e . && python -m compileall -q recsys worker web

# --- runtime: the venv and the source, no compilers or pip caches, a non-root user
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 RECSYS_HOME=/var/lib/recsys HF_HUB_DISABLE_TELEMETRY=1
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/recsys --create-home recsys \
    && mkdir -p /var/lib/recsys/models && chown -R recsys:recsys /var/lib/recsys
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
USER recsys
EXPOSE 8000
CMD ["recsys", "serve", "--host", "0.0.0.0"]
