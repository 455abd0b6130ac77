# The tierpool image: every role is a `tierpool` subcommand (worker, gateway, pod-sim...).
#   docker build -t tierpool .
#   docker run --rm -e REDIS_URL=redis://redis-host:6380/0 tierpool worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
# tierpool/ links the top-level folders in as its subpackages.
COPY tierpool tierpool
COPY core core
COPY schemas schemas
COPY workers workers
COPY client client
COPY bench bench
COPY gateway gateway
COPY kube kube
COPY connect connect
# The kubernetes extra: the same image runs with POD_SOURCE=kubernetes.
RUN pip install '.[kubernetes]' && useradd --system --no-create-home tierpool

USER tierpool
# /metrics, /healthz, /readyz of a worker (METRICS_PORT); the gateway's HTTP_PORT.
EXPOSE 9090 8080
ENTRYPOINT ["tierpool"]
CMD ["worker"]
