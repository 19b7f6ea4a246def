# Backend (--role backend): the engine on a CUDA image with torch. Build from the repository root:
#   docker build -f deploy/docker/backend.Dockerfile -t cosyserve-backend:0.1.0 .
# The same image runs the init containers of the overlays (tiny model maker, ModelScope download).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HOME=/tmp
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin cosyserve
WORKDIR /app
RUN pip install "modelscope>=1.20"
COPY pyproject.toml README.md ./
COPY server ./server
COPY scheduler ./scheduler
COPY kernels ./kernels
COPY protocol ./protocol
COPY frontend ./frontend
COPY bench ./bench
# The engine extra; the image's torch (2.5.1, CUDA 12.4) satisfies its range, so pip keeps it.
RUN pip install '.[engine]' && python -c "import torch, server.wiring; print(torch.__version__)"
USER 10001:10001
ENV COSYSERVE_ROLE=backend COSYSERVE_HOST=0.0.0.0 COSYSERVE_PORT=8001 COSYSERVE_DATA_DIR=/data
EXPOSE 8001
ENTRYPOINT ["python", "-m", "server"]
CMD ["--role", "backend"]
