# One image for the Ray head, the workers and the submitter (the cluster issue extends this).
# On a GPU node the same pins resolve to the CUDA builds of torch 2.13.0 / torchvision 0.28.0.
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
RUN useradd --create-home --uid 1000 lowrank
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY lowrank ./lowrank
COPY jobs ./jobs
RUN pip install --no-cache-dir -c constraints.txt '.[jobs]'
USER lowrank
CMD ["python", "-m", "jobs", "run"]
