# syntax=docker/dockerfile:1
# Refleet's image: both binaries, `refleet` (operator, `refleet up`, `refleet crds`) and
# `refleet-reflector`, on a distroless runtime as a non-root user.
#
#   docker build -t registry.example.com/refleet:0.1.0 .
#
# Without Docker, scripts/build-image makes the same image (same files under /usr/local/bin,
# same user, working directory, environment, ports and entrypoint; `./scripts/test image`
# compares the two) from target/release on a scratch base, with only the libraries the
# binaries link instead of distroless's. The release profile strips the binaries (Cargo.toml).
#
# The default entrypoint runs a reflector (the pods the operator creates set no command);
# the Helm chart runs the operator with `command: [/usr/local/bin/refleet, operator]`.
# Nothing here needs root or a writable root filesystem: reflectors write only to their
# storage (/data, an emptyDir in the pods the operator creates, or object storage) and
# both binaries only to /tmp, so the pods run read-only under the restricted Pod Security
# Standard. The chart tests check this file against the chart and the binaries.

# ---- build: the toolchain pinned by rust-toolchain.toml, on the runtime's Debian release
FROM docker.io/library/rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p refleet-operator -p refleet-reflector \
 && install -D -m 0755 target/release/refleet /out/refleet \
 && install -D -m 0755 target/release/refleet-reflector /out/refleet-reflector \
 && install -d -m 0750 -o 65532 -g 65532 /out/data

# ---- runtime: glibc + libgcc only, user nonroot (65532:65532), no shell
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/refleet /out/refleet-reflector /usr/local/bin/
# The reflector's default storage when nothing is mounted there (`docker run`).
COPY --from=build --chown=65532:65532 /out/data /data
USER 65532:65532
WORKDIR /data
ENV REFLEET_STORAGE=file:///data
# 7070 reflector (WebSocket, /files, /healthz, /readyz, /metrics);
# 8080 router, 8081 report stream, 9090 operator /metrics and /healthz.
EXPOSE 7070 8080 8081 9090
ENTRYPOINT ["/usr/local/bin/refleet-reflector"]
