# Audio-Interaction server. docs/deployment.md explains running it (docker compose up).
#
# No `# syntax=` line on purpose: it makes BuildKit pull a frontend image from a registry first, so
# an air-gapped build fails; the built-in frontend reads everything used here. Podman/buildah write
# OCI images by default, and the OCI format has no HEALTHCHECK: build with `--format docker`.
#
# Base image: plain Python 3.11, not nvidia/cuda. On Linux x86_64, PyPI's torch==2.13.0 is the
# CUDA 13.0 build and installs its own CUDA user-space as wheels (cuda-toolkit 13.0.3: cudart,
# cuBLAS, cuFFT, NVRTC...; nvidia-cudnn-cu13 9.20; NCCL), and torch loads those, never a system
# copy. A cuda/cudnn "runtime" base image would add a second, unused CUDA of several GB. What the
# container needs from the host is the NVIDIA driver (>= 580, the CUDA 13.0 minimum) and the NVIDIA
# Container Toolkit. NVIDIA_REQUIRE_CUDA below makes the toolkit refuse an older driver. Unlike
# nvidia/cuda images this one does not set NVIDIA_VISIBLE_DEVICES=all: where the NVIDIA runtime is
# the host's default, that would hand every GPU to every container of the image, the CPU demo too.
# docker-compose.yml sets it on the GPU service only.
#
# Versions: constraints.txt pins every runtime dependency but torch (whose pin is TORCH_VERSION), so
# a rebuild installs the same packages. Regenerate it with python -m audio_interaction_server.tools.freeze_constraints.
#
# Build args:
#   TORCH_INDEX_URL  empty = PyPI (the CUDA build above). https://download.pytorch.org/whl/cpu
#                    gives the CPU-only wheel: a much smaller image for the CPU demo.
#   TORCH_VERSION    keep equal to the README's pin.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app

# Layer 1, torch and its own dependencies: by far the largest, rebuilt only when TORCH_VERSION,
# TORCH_INDEX_URL or constraints.txt change. From another index only torch itself is taken (an index
# such as download.pytorch.org/whl/cpu need not carry the pinned versions of sympy, networkx...);
# its dependencies then come from the default index at the pinned versions, as on PyPI's build.
WORKDIR /app
COPY constraints.txt ./
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi \
    && pip install -c constraints.txt "torch==${TORCH_VERSION}"

# Layer 2, the other dependencies, read from pyproject.toml (one list to maintain) at the versions of
# constraints.txt; the torch constraint keeps the torch installed above. Rebuilt only when
# pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
    && pip install -r /tmp/requirements.txt -c constraints.txt -c /tmp/torch-constraint.txt \
    && rm /tmp/requirements.txt /tmp/torch-constraint.txt

# Layer 3, the code: a code change rebuilds only from here. The package runs from /app/server (not
# pip-installed: the dependencies are already in place); its default.yaml is inside it.
COPY server ./server
ENV PYTHONPATH=/app/server

# The --demo model, generated at build time (it needs the Qwen vocabulary, fetched from PyPI's
# dashscope wheel) so the demo starts offline and instantly; about 100 MB, read-only at run time.
ENV AUDIO_INTERACTION_CACHE=/opt/audio-interaction
RUN python -c "from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint; print(ensure_demo_checkpoint())" \
    && chmod -R a+rX /opt/audio-interaction

# Checkpoints: a release-layout directory mounted at /models (read-only is fine), or a Hub repo id in
# AIS_ENGINE__CHECKPOINT, downloaded into HF_HOME (mount a volume at /cache to keep it).
ENV AIS_ENGINE__CHECKPOINT=/models \
    HF_HOME=/cache/huggingface
RUN mkdir -p /models /cache/huggingface && chown -R app:app /cache

USER 10001:10001
EXPOSE 8000

# Liveness: /health answers as soon as the process serves, also while a large checkpoint loads
# (/ready says when sessions are accepted). It follows AIS_PORT if the port is changed that way, and
# AIS_SSL_CERTFILE (https://, certificate not verified: it is this process on the loopback).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; tls = bool(os.environ.get('AIS_SSL_CERTFILE')); urllib.request.urlopen('%s://127.0.0.1:%s/health' % ('https' if tls else 'http', os.environ.get('AIS_PORT') or '8000'), timeout=4, context=ssl._create_unverified_context() if tls else None)"]

ENTRYPOINT ["python", "-m", "audio_interaction_server", "--host", "0.0.0.0"]
CMD []
