# One image for every cityops service: `cityops ingest|rules|api|simulate|migrate`.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cityops ./cityops
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /app cityops
COPY --from=build /install /usr/local
WORKDIR /app
USER cityops
ENV PYTHONUNBUFFERED=1 CITYOPS_LOG_FORMAT=json
ENTRYPOINT ["cityops"]
CMD ["--help"]
