# One image for web, worker and migrations. TORCH_SPEC picks the wheel: the CUDA build for GPU
# workers (the default index), or e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 RECSYS_HOME=/var/lib/recsys

WORKDIR /app
RUN pip install ${TORCH_SPEC}
COPY pyproject.toml README.md alembic.ini ./
COPY recsys ./recsys
COPY worker ./worker
COPY web ./web
COPY migrations ./migrations
COPY sql ./sql
COPY data ./data
RUN pip install -e . && mkdir -p /var/lib/recsys && useradd --system --home /var/lib/recsys recsys \
    && chown recsys /var/lib/recsys
USER recsys
EXPOSE 8000
CMD ["recsys", "serve", "--host", "0.0.0.0"]
