# The operator image: `poolbudget run` as an unprivileged user on a slim Python base.
# (No Docker engine on the project's build machines: this file is kept small and plain.)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install --no-cache-dir --prefix=/install '.[operator]'

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN groupadd --gid 10001 poolbudget \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin poolbudget
USER 10001:10001
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 8080 8081
ENTRYPOINT ["poolbudget"]
CMD ["run"]
