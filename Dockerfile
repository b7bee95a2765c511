# The project's image: a worker runs `mlflow run . -e tune --env-manager local` in it (deploy/k8s/).
# BASE is any Debian bookworm (its python3 is 3.11): debian:bookworm-slim from a registry, or, where
# nothing can be pulled, one made with debootstrap and `docker import` (docs/kubernetes.md).
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# pip reads it: PyPI, or a local mirror of the pinned wheels where PyPI cannot be reached (docs/kubernetes.md).
ARG PIP_INDEX_URL=https://pypi.org/simple

# dumb-init as PID 1 turns the kubelet's SIGTERM into SIGINT for the whole process group: `mlflow run`
# takes it as Ctrl-C and waits while tune re-queues its trial (Python as PID 1 would ignore SIGTERM).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv dumb-init ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /tmp/requirements.txt
# requirements.txt's pins less the test and lint tools; no pip cache in the layer.
RUN python3 -m venv /opt/venv \
    && grep -vE '^(pytest|pytest-cov|pytest-xdist|hypothesis|ruff|kubernetes-validate)==' /tmp/requirements.txt > /tmp/runtime.txt \
    && pip install --no-cache-dir -r /tmp/runtime.txt \
    && rm /tmp/requirements.txt /tmp/runtime.txt

# Not root: the code is read-only to the worker, which writes only to /tmp, HOME and mounted volumes.
RUN useradd --uid 10001 --create-home --home-dir /home/worker worker
WORKDIR /app
COPY . .
USER 10001
ENTRYPOINT ["dumb-init", "--rewrite", "15:2", "--"]
CMD ["mlflow", "run", ".", "-e", "tune", "--env-manager", "local"]
