# meterline:latest for docker-compose.yml: the `meter` binary on Debian.
#
# librdkafka is built with TLS and SASL against Debian's OpenSSL (rdkafka's
# `ssl` feature): libssl-dev and pkg-config to build, libssl3 at run time.
# Debian patches that OpenSSL for security advisories, so an image rebuilt
# on the current base picks the fixes up; a vendored OpenSSL would have to
# be rebuilt by us for each one. TLS to ClickHouse is rustls (no system
# library); without clickhouse.ca_file it trusts ca-certificates' store.
#
# No secret is built into the image. Passwords, keys and CA certificates are
# mounted as files at run time (Docker secrets, /run/secrets/...) and named
# by the `..._file` settings, e.g. METER__CLICKHOUSE__PASSWORD_FILE and
# METER__KAFKA__PROPERTIES__SASL_PASSWORD_FILE (docker-compose.secure.yml).
# Keep ./secrets/ out of the build context (.dockerignore): `COPY . .`
# would put it into the build stage.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --locked --release --bin meter

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libcurl4 libssl3 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/meter /usr/local/bin/meter
USER nobody
ENTRYPOINT []
CMD ["meter", "--help"]
