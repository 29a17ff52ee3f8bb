# One image for every container of docker-compose.yml (the Ray head, the Ray worker nodes, the
# server): this project and its dependencies in a virtual environment, and no checkpoint but the
# 4.6 MB built-in model that ships in the package (checkpoints come from a volume; the built-in model
# is copied on first start into $MOE_SERVING_CACHE).
#
#   docker build -t moe-serving .                                  # CPU torch, on python:3.11-slim
#   docker build -t moe-serving:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # on a CUDA base
#   docker build --build-arg BASE_IMAGE=my-debian:bookworm .       # a builder with no registry
#
# BASE_IMAGE may be any Debian or Ubuntu image; Python 3 is installed with apt where it has none.
# The CUDA torch wheels carry their own CUDA libraries, so a CUDA base is optional: the GPU comes
# from the NVIDIA container runtime. torch is installed first, at the version pyproject.toml pins:
# from a wheel in cluster/docker/wheelhouse/ when one is there (then nothing is downloaded for it,
# and no wrong build can slip in), else from TORCH_INDEX_URL (default: PyTorch's CPU wheels, so a
# CPU image never pulls the multi-GB CUDA build PyPI's torch depends on; empty: from PyPI).
# cluster/docker/certs/ca-bundle.crt, when present, is pip's CA bundle (a TLS-intercepting proxy).
# Wheelhouse and certificate stay in the build stage; the image gets only /opt/venv.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
COPY cluster/docker/wheelhouse/ /tmp/wheelhouse/
COPY cluster/docker/certs/ /tmp/certs/
COPY pyproject.toml /src/pyproject.toml
# Layers rebuilt only when their input changes: torch (the pin), the dependencies (pyproject.toml:
# with no packages there yet, this installs them and an empty project, removed again), and the
# project's wheel (every change to the code). The image gets the environment and, in a small layer
# of its own, the wheel: a code change does not copy the 1.5 GB environment again.
RUN set -eu; \
    if [ -s /tmp/certs/ca-bundle.crt ]; then export PIP_CERT=/tmp/certs/ca-bundle.crt; fi; \
    torch=$(sed -n 's/^[[:space:]]*"\(torch==[^"]*\)".*/\1/p' /src/pyproject.toml); \
    [ -n "$torch" ] || { echo "no torch== pin in pyproject.toml" >&2; exit 1; }; \
    if ls /tmp/wheelhouse/torch-*.whl >/dev/null 2>&1; then \
        pip install --no-index --no-deps --find-links /tmp/wheelhouse "$torch"; \
        pip install --find-links /tmp/wheelhouse "$torch"; \
    elif [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$torch"; \
    else \
        pip install "$torch"; \
    fi
RUN set -eu; \
    if [ -s /tmp/certs/ca-bundle.crt ]; then export PIP_CERT=/tmp/certs/ca-bundle.crt; fi; \
    touch /src/README.md; \
    pip install --find-links /tmp/wheelhouse /src; \
    pip uninstall --yes moe-serving; \
    rm -rf /src
COPY . /src
RUN set -eu; \
    if [ -s /tmp/certs/ca-bundle.crt ]; then export PIP_CERT=/tmp/certs/ca-bundle.crt; fi; \
    pip wheel --no-deps --wheel-dir /wheels /src

FROM base
# uid 1000: the owner compose's notes expect for checkpoint files. Ubuntu 24.04 images (the CUDA
# bases) already have a user "ubuntu" with that uid, which is removed first.
RUN if existing=$(getent passwd 1000 | cut -d: -f1) && [ -n "$existing" ]; then userdel --remove "$existing"; fi \
    && useradd --create-home --uid 1000 --shell /bin/sh moe \
    && mkdir -p /cache /models /tmp/ray /opt/moe \
    && chown moe:moe /cache /models /tmp/ray
COPY --from=build /opt/venv /opt/venv
COPY --from=build /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && /opt/venv/bin/python -c 'import torch, ray, router_service, expert_workers, moe_serving; print("torch", torch.__version__, "ray", ray.__version__)'
COPY cluster/docker/healthcheck.py /opt/moe/healthcheck.py
# RAY_USAGE_STATS_ENABLED=0: no node of this cluster reports usage to anyone.
ENV PATH=/opt/venv/bin:$PATH \
    MOE_SERVING_CACHE=/cache \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0
USER moe
WORKDIR /home/moe
EXPOSE 8000 50051
# Alone (docker run -p 127.0.0.1:8000:8000 --shm-size=1g IMAGE): a local Ray and the built-in model.
CMD ["moe-serve", "serve", "--host", "0.0.0.0"]
