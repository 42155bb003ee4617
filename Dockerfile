# The operator image: `poolbudget run` as an unprivileged user on a slim Python base.
#   docker build -t poolbudget-operator:0.1.0 .
# `make image` builds this same file without a Docker engine (buildah, see
# devtools/images.py), with BASE_IMAGE set to a Debian bookworm base made with debootstrap.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
RUN python3 -m venv /opt/poolbudget
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN /opt/poolbudget/bin/pip install --no-cache-dir '.[operator]'

FROM ${BASE_IMAGE}
COPY --from=build /opt/poolbudget /opt/poolbudget
RUN groupadd --gid 10001 poolbudget \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin poolbudget
USER 10001:10001
ENV PATH=/opt/poolbudget/bin:/usr/local/bin:/usr/bin:/bin PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 8080 8081
ENTRYPOINT ["poolbudget"]
CMD ["run"]
