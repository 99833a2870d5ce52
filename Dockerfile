# syntax=docker/dockerfile:1
# Build stage: compile the wheel (and the generated gRPC code) once.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ledger ./ledger
COPY controls ./controls
COPY projections ./projections
COPY custody_verify ./custody_verify
COPY risk ./risk
COPY reconciliation ./reconciliation
COPY protos ./protos
COPY setup.py MANIFEST.in ./
RUN pip install --no-cache-dir build==1.2.2 && python -m build --wheel --outdir /wheels

# Runtime stage: only the wheel and its dependencies, a non-root user, no -O (assertions stay on).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CUSTODY_DATA_DIR=/var/lib/custody
RUN groupadd --system --gid 10001 custody \
    && useradd --system --uid 10001 --gid custody --home-dir /var/lib/custody --no-create-home custody \
    && mkdir -p /var/lib/custody && chown custody:custody /var/lib/custody
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
WORKDIR /var/lib/custody
VOLUME ["/var/lib/custody"]
EXPOSE 50051
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["custody-health", "--address", "127.0.0.1:50052"]
ENTRYPOINT ["custody"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--tls-dir", "/etc/custody/tls", "--health-port", "50052"]
