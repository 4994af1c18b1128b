# One image for the Ray head, the Ray workers, the submitter and the MLflow server.
# Built from the same pins as development: on linux/x86_64, torch==2.13.0 from PyPI is the CUDA
# build, so GPU workers use the GPU with no other change.
#   docker build -t ghcr.io/lowrank-runner/lowrank-runner:0.1.0 .
FROM python:3.11-slim
LABEL org.opencontainers.image.ref.name="ghcr.io/lowrank-runner/lowrank-runner:0.1.0" \
      org.opencontainers.image.source="https://github.com/lowrank-runner/lowrank-runner"
# Ray token authentication is on in every container (the token: RAY_AUTH_TOKEN from a Kubernetes
# Secret, or generated on first use by a stand-alone `python -m jobs run`).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 lowrank
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY lowrank ./lowrank
COPY jobs ./jobs
COPY cluster/sweeps /specs
RUN pip install --no-cache-dir -c constraints.txt '.[jobs,server]'
USER lowrank
ENV HOME=/home/lowrank
CMD ["python", "-m", "jobs", "run"]
