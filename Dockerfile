# CPU image of the ichscan web app (ichscan serve). Research software, not a medical device.
#   docker build -t ichscan .
#   docker run -p 8000:8000 -v /path/to/model:/model:ro -v ichscan-data:/data \
#       -e ICHSCAN_TOKEN=change-me ichscan
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src

# torch from PyTorch's CPU wheel index (no CUDA libraries in the image); constraints.txt pins
# the torch and torchvision versions the project is tested with.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -c constraints.txt . \
    && groupadd --gid 10001 ichscan \
    && useradd --uid 10001 --gid 10001 --create-home ichscan \
    && mkdir /data /model \
    && chown 10001:10001 /data

# Numeric, so that the host (and Kubernetes' runAsNonRoot) can tell it is not root.
USER 10001:10001
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/health', timeout=4)"]
CMD ["ichscan", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/model", "--data", "/data"]
