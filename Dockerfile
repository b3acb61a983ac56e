# syntax=docker/dockerfile:1
#
# tokenbroker production image: a --locked release build without the `emulator`
# feature, on a distroless, non-root runtime that carries CA certificates and glibc
# only. Built by the release pipeline, e.g.
#
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE=<repository URL> -t <registry>/tokenbroker:0.1.0 .
#
# No Docker engine exists on the project's CI machines: CI lints this file
# (hadolint, checkov) in scripts/validate-deploy.sh but does not build it.
# See docs/DEPLOY.md.
#
# checkov:skip=CKV_DOCKER_2: no HEALTHCHECK on purpose: Kubernetes probes on the admin port (/healthz, /readyz) decide health; distroless has no shell or curl to run one
# (CKV_DOCKER_7 "tag not latest" passes: both base images carry explicit tags.)
#
# Base images: by tag here, as the repository cannot look up registry digests (no Docker
# engine, no registry access in CI). The release pins both by digest before building, so
# a rebuild of the same commit gets the same bases (docs/DEPLOY.md, "The image"):
#   crane digest rust:1.95-bookworm          # or: docker buildx imagetools inspect <image>
#   crane digest gcr.io/distroless/cc-debian12:nonroot
# then FROM rust:${RUST_VERSION}-bookworm@sha256:<digest> and
# FROM gcr.io/distroless/cc-debian12:nonroot@sha256:<digest>.

# Rust toolchain of the build stage. The crate's MSRV is 1.88; CI builds with the
# current stable, so the image builds with the same one (both are Debian 12 "bookworm",
# matching the glibc of the distroless runtime below).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The context is an allowlist (.dockerignore): Cargo.toml, Cargo.lock, build.rs and proto/
# (protox, no protoc), src/, and the bench and test target files Cargo.toml names by path.
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit); the binary
# is copied out of the cached target dir so the next stage can take it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --no-default-features --bin tokenbroker \
    && install -D -m 0755 target/release/tokenbroker /out/tokenbroker

# cc-debian12: glibc, libgcc, CA certificates (/etc/ssl/certs), tzdata; no shell.
# The :nonroot variant runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

# Set by the release pipeline: the crate version, the commit and the repository URL.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="tokenbroker" \
      org.opencontainers.image.description="Entra ID access tokens for many tenants, signed by Azure Key Vault, served over gRPC. Holds no secrets." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /out/tokenbroker /usr/local/bin/tokenbroker

# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
# 50051: gRPC (TLS) with grpc.health.v1; 9090: admin HTTP (/healthz, /readyz, /metrics).
EXPOSE 50051 9090
# Writes nothing to its filesystem: runs with a read-only root. The config file and
# the TLS key pair are mounted (ConfigMap, Secret) under /etc/tokenbroker.
ENTRYPOINT ["/usr/local/bin/tokenbroker"]
CMD ["serve", "--config", "/etc/tokenbroker/broker.toml"]
