# syntax=docker/dockerfile:1
# service-controller-manager: a static binary on distroless, running as a fixed non-root UID.
#
#   docker build -t service-controller-manager:0.1.0 .
#
# TARGET picks the libc: musl (default; fully static, no NSS at run time) or
# x86_64-unknown-linux-gnu (glibc linked statically with crt-static; what
# tests/scripts/image-check.sh builds on machines without the musl target).
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG TARGET=x86_64-unknown-linux-musl
RUN if [ "$TARGET" = "x86_64-unknown-linux-musl" ]; then \
      apt-get update && apt-get install -y --no-install-recommends musl-tools && \
      rm -rf /var/lib/apt/lists/* && rustup target add "$TARGET"; \
    fi
WORKDIR /src
COPY . .
# The same command as tests/scripts/image-check.sh, so the check tests what this copies.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cargo-target \
    CARGO_TARGET_DIR=/cargo-target RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --locked --release --bin service-controller-manager --target "$TARGET" && \
    cp "/cargo-target/$TARGET/release/service-controller-manager" /service-controller-manager

# distroless/static: CA certificates, /etc/passwd with nonroot (65532), tzdata; no shell.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /service-controller-manager /service-controller-manager
USER 65532:65532
EXPOSE 10270
ENTRYPOINT ["/service-controller-manager"]
