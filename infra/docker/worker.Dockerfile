# syntax=docker/dockerfile:1
# The Prefect process worker: polls the work pool `recsys-process` and runs the deployments of prefect.yaml
# (recsys/flows/*) from this image's copy of the project (/app = RECSYS_PROJECT_DIR, the pull step's directory).
# Build from the repository root:  docker build -f infra/docker/worker.Dockerfile -t recsys-worker:0.1.0 .
# Needs PREFECT_API_URL (e.g. http://prefect-server:4200/api). The same image runs `prefect deploy --all`.
FROM python:3.11-slim

# torch comes from PyTorch's CPU wheel index (no CUDA libraries: a much smaller image); the other pins come
# from PyPI. torch==2.13.0 matches the CPU wheel 2.13.0+cpu, so the second install keeps it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1 \
    BENTOML_DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    RECSYS_HOME=/var/lib/recsys \
    BENTOML_HOME=/var/lib/recsys/bentoml \
    PREFECT_HOME=/var/lib/recsys/prefect \
    RECSYS_PROJECT_DIR=/app

# A fixed non-root uid (10001) that owns the state directory, so a fresh named volume inherits its owner.
RUN useradd --create-home --uid 10001 recsys \
    && mkdir -p /var/lib/recsys \
    && chown recsys:recsys /var/lib/recsys

WORKDIR /app

# Dependencies first, from pyproject.toml alone: a code change does not reinstall torch.
COPY pyproject.toml README.md ./
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY prefect.toml prefect.yaml ./
COPY recsys/ recsys/
# Editable: the project root stays /app, where recsys/serving/build.py finds pyproject.toml and the bento context.
RUN pip install --no-deps -e .

USER recsys
CMD ["prefect", "worker", "start", "--pool", "recsys-process", "--type", "process"]
