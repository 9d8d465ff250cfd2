# The linewatch project image: runs the MLflow tracking server, the Prefect server, the Prefect worker (which runs
# the linewatch flows) and the one-shot deploy job of docker-compose.yml. One image = one set of pinned versions.
#   docker build -t linewatch:latest .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    LINEWATCH_HOME=/data/linewatch

# git: pipeline.settings.code_version() reads the commit when the checkout is mounted; tini: signal handling.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git tini \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY models ./models
COPY pipeline ./pipeline
COPY flows ./flows

# CPU torch: the default PyPI torch wheel for Linux x86_64 pulls the CUDA build (several GB). The extra index serves
# torch==2.13.0+cpu, which satisfies the `torch==2.13.0` pin of constraints.txt. For a GPU worker image drop the
# extra index (or point it at the matching CUDA index, e.g. https://download.pytorch.org/whl/cu126).
# psycopg2-binary: mlflow server -> PostgreSQL; boto3: mlflow server -> S3 (SeaweedFS). asyncpg comes with prefect.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --extra-index-url "${TORCH_INDEX}" -c constraints.txt . psycopg2-binary boto3

COPY prefect.yaml ./
COPY deploy ./deploy

RUN useradd --create-home --uid 1000 linewatch \
 && mkdir -p /data/linewatch \
 && chown -R linewatch /data /app
USER linewatch

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["linewatch", "--help"]
