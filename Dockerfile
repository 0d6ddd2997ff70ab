# TorchServe with our frontend patch, serving the archives of model_store/ (CPU by default).
#
#   buildah bud -t ts-image-classifier .                       # or: docker build
#   buildah bud -t ts-image-classifier:gpu \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   podman run -p 8080-8082:8080-8082 -v ./model_store:/home/model-server/model-store ts-image-classifier
#
# Paths as in the official pytorch/torchserve images: /home/model-server/config.properties and
# /home/model-server/model-store (every archive there is served: load_models=all), user
# model-server (non-root), ports 8080 (inference), 8081 (management), 8082 (metrics).
# Token authorization stays on (keys in /home/model-server/key_file.json); TS_DISABLE_TOKEN_AUTH=true
# turns it off where something in front of the server authenticates (a KServe ingress).

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3-venv for CUDA base images (Ubuntu), a no-op on python:* images
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jdk-headless libasm-java unzip \
       python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
       -r /tmp/requirements.txt
COPY scripts/ts_patches /tmp/ts_patches
RUN bash /tmp/ts_patches/build.sh /opt/venv/bin/python /opt/ts-patches.jar

FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /bin/bash model-server \
    && mkdir -p /home/model-server/model-store /home/model-server/logs \
    && chown -R model-server:model-server /home/model-server
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/ts-patches.jar /opt/ts-patches.jar
COPY --chown=model-server:model-server docker/config.properties /home/model-server/config.properties
COPY --chown=model-server:model-server monitoring/metrics.yaml /home/model-server/metrics.yaml
COPY docker/entrypoint.sh /usr/local/bin/entrypoint.sh
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    JAVA_TOOL_OPTIONS=-javaagent:/opt/ts-patches.jar \
    TS_DISABLE_TOKEN_AUTH=false \
    TEMP=/home/model-server/tmp
USER 1000
WORKDIR /home/model-server
EXPOSE 8080 8081 8082
# the frontend patch's open liveness route (no key needed, so the probe survives key rotation)
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=4)"]
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["serve"]
