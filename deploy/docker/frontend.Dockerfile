# Frontend (--role frontend): the public API, no torch. Build from the repository root:
#   docker build -f deploy/docker/frontend.Dockerfile -t cosyserve-frontend:0.1.0 .
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HOME=/tmp
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin cosyserve
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY scheduler ./scheduler
COPY kernels ./kernels
COPY protocol ./protocol
COPY frontend ./frontend
COPY bench ./bench
# torch-free: the base install plus the frontend extra (the S3 client); no engine extra. The import
# check fails the build if anything pulled torch in.
RUN pip install '.[frontend]' \
    && python -c "import importlib.util as u; assert u.find_spec('torch') is None; import server.wiring"
USER 10001:10001
ENV COSYSERVE_ROLE=frontend COSYSERVE_HOST=0.0.0.0 COSYSERVE_PORT=8000 COSYSERVE_DATA_DIR=/data
EXPOSE 8000
ENTRYPOINT ["python", "-m", "server"]
CMD ["--role", "frontend"]
