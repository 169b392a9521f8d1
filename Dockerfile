# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t difftrain/operator .   # the Kopf operator: no torch
#   docker build --target trainer  -t difftrain/trainer  .   # training, merges, dataset tools
# Both run as the unprivileged user 1000 with a read-only root filesystem in mind (writes go to
# /tmp, which the operator mounts as an emptyDir), matching the Pod Security "restricted" profile.
# The trainer needs no CUDA base image: the PyTorch wheels bring their CUDA libraries, and the
# node's driver comes in through the NVIDIA container runtime.
#
# Layers: the dependencies are installed from pyproject.toml alone, before the source is copied,
# and copied into the final image as a layer of their own; our code comes on top as a wheel, so a
# source change rebuilds only the last small layers. pip's cache is a build cache mount.
# Any image with Python 3.11+ and its venv module works as PYTHON_IMAGE (the tests build one
# from Debian's packages: tests/infra/images.py).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# The stage (or an image built from it earlier) each final image starts from; a builder that
# keeps the runtime images passes them here, and the dependency stages are then not built at all
ARG OPERATOR_RUNTIME=operator-runtime
ARG TRAINER_RUNTIME=trainer-runtime

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 1000 difftrain \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin difftrain

FROM base AS build
WORKDIR /src
COPY pyproject.toml ./
COPY hack/requirements.py hack/
RUN python3 -m venv /opt/difftrain

FROM build AS deps-operator
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 hack/requirements.py pyproject.toml > requirements.txt \
 && /opt/difftrain/bin/pip install -r requirements.txt

FROM build AS deps-trainer
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 hack/requirements.py pyproject.toml train > requirements.txt \
 && /opt/difftrain/bin/pip install -r requirements.txt

# our own code as a wheel: the final images copy the dependencies' venv as one layer that a source
# change leaves alone, then install this small wheel on top
FROM build AS wheel
COPY README.md ./
COPY trainer trainer
COPY operator operator
RUN --mount=type=cache,target=/root/.cache/pip /opt/difftrain/bin/pip wheel --no-deps -w /dist .

# each image is its runtime (base and dependencies, no code of ours) with the wheel on top; a
# builder that tags the runtime stage keeps that layer for every later source change
# (tests/infra/images.py: layer caches key on file times, which a fresh clone changes)
FROM base AS operator-runtime
COPY --from=deps-operator /opt/difftrain /opt/difftrain

FROM ${OPERATOR_RUNTIME} AS operator
COPY --from=wheel /dist /tmp/dist
RUN /opt/difftrain/bin/pip install --no-deps --no-index /tmp/dist/*.whl && rm -rf /tmp/dist
ENV PATH=/opt/difftrain/bin:$PATH HOME=/tmp
USER 1000:1000
EXPOSE 8080 8081
ENTRYPOINT ["difftrain"]
CMD ["operator"]

FROM base AS trainer-runtime
COPY --from=deps-trainer /opt/difftrain /opt/difftrain

FROM ${TRAINER_RUNTIME} AS trainer
COPY --from=wheel /dist /tmp/dist
RUN /opt/difftrain/bin/pip install --no-deps --no-index /tmp/dist/*.whl && rm -rf /tmp/dist
# Model hubs and caches write under HOME; /tmp is the pod's writable scratch volume.
ENV PATH=/opt/difftrain/bin:$PATH HOME=/tmp HF_HOME=/tmp/hf XDG_CACHE_HOME=/tmp/cache
USER 1000:1000
EXPOSE 9090
ENTRYPOINT ["difftrain"]
CMD ["--help"]
