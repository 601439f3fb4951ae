# Aspire: one image carrying aspire-discovery, aspire-worker, aspire-router and aspirectl.
#
# Two stages:
#   build    Debian 12 + Rust (rustup, pinned) + LibTorch from the torch 2.11.0 wheel (PyPI),
#            `cargo build --release` of the four binaries, then collects the binaries and
#            exactly the shared libraries they load (ldd) into /out.
#   runtime  debian:bookworm-slim + ca-certificates + /out: binaries in /usr/local/bin,
#            LibTorch's libraries in /opt/libtorch/lib, a non-root user.
#
#   docker build --network=host -t aspire:0.1.0 .                                  # CPU image
#   docker build --network=host -t aspire:0.1.0-cuda --build-arg TORCH_VARIANT=cuda .  # GPU image
#
# The build stage downloads from static.rust-lang.org (rustup), crates.io and PyPI, so it
# needs network (--network=host when dockerd runs with --bridge=none, see
# scripts/build_image.sh). The base image is only named here; deploy/README.md says how to
# make it locally when no registry is reachable.
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS build
# 1.85 is the workspace's rust-version; this is the toolchain the project is built and
# tested with.
ARG RUST_VERSION=1.95.0
# tch 0.24 needs exactly torch 2.11.0 (see scripts/setup.sh).
ARG TORCH_VERSION=2.11.0
# cpu: LibTorch's CPU libraries only (a few hundred MB). cuda: every CUDA library of the
# wheel, and the worker linked against libtorch_cuda.so (TCH_LINK_CUDA=1), several GB.
ARG TORCH_VARIANT=cpu
ARG CARGO_BUILD_JOBS=2

# libprotobuf-dev: the well-known .proto files (descriptor.proto, ...) etcd-client's protos
# import; --no-install-recommends would otherwise leave them out.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential ca-certificates curl libprotobuf-dev pkg-config protobuf-compiler python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# Behind a TLS-intercepting proxy the registries' certificates are signed by the proxy's CA:
# scripts/build_image.sh copies the build host's local CAs (/usr/local/share/ca-certificates)
# here. Only this stage trusts them; the runtime image has Debian's bundle alone.
COPY deploy/docker/extra-ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:$PATH \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    CARGO_HTTP_CAINFO=/etc/ssl/certs/ca-certificates.crt
RUN set -eu; \
    url=https://static.rust-lang.org/rustup/dist/x86_64-unknown-linux-gnu/rustup-init; \
    curl --proto '=https' --tlsv1.2 -sSf "$url" -o /tmp/rustup-init; \
    curl --proto '=https' --tlsv1.2 -sSf "$url.sha256" | awk '{print $1 "  /tmp/rustup-init"}' | sha256sum -c -; \
    chmod +x /tmp/rustup-init; \
    /tmp/rustup-init -y -q --no-modify-path --profile minimal --default-toolchain "$RUST_VERSION"; \
    rm /tmp/rustup-init; \
    rustc --version

WORKDIR /src
# LibTorch comes from the torch wheel, in the venv .cargo/config.toml points tch at
# (.venv/lib/python3.11/site-packages/torch; Debian 12's python3 is 3.11). For the CPU
# image the wheel alone is enough for Rust, plus the two CUDA runtime libraries that
# libtorch_cpu.so links (it is a CUDA 13 build that runs on CPU).
RUN set -eu; \
    python3 -m venv .venv; \
    if [ "$TORCH_VARIANT" = cuda ]; then \
        .venv/bin/pip install -q --no-cache-dir "torch==$TORCH_VERSION"; \
    else \
        .venv/bin/pip install -q --no-cache-dir --no-deps "torch==$TORCH_VERSION"; \
        .venv/bin/pip install -q --no-cache-dir "cuda-toolkit[cudart,cupti]==13.0.2"; \
    fi

COPY . .
RUN set -eu; \
    if [ "$TORCH_VARIANT" = cuda ]; then export TCH_LINK_CUDA=1; fi; \
    cargo build --release --locked -j "$CARGO_BUILD_JOBS" \
        -p aspire-discovery -p aspire-worker -p aspire-router -p aspirectl --bins

# Collect the binaries and the libraries they load. For CPU that is what ldd reports from
# the venv: libtorch_cpu.so, libc10.so, libgomp.so.1, libcudart.so.13, libcupti.so.13.
# CUDA also loads libraries at run time (cuDNN's sub-libraries, NVRTC), which ldd cannot
# see, so that variant takes every library of the wheel.
RUN set -eu; \
    mkdir -p /out/bin /out/lib; \
    for b in aspire-discovery aspire-worker aspire-router aspirectl; do \
        strip -o "/out/bin/$b" "target/release/$b"; \
    done; \
    site=.venv/lib/python3.11/site-packages; \
    if [ "$TORCH_VARIANT" = cuda ]; then \
        cp -L "$site"/torch/lib/*.so* /out/lib/; \
        find "$site"/nvidia -name '*.so*' -exec cp -L -t /out/lib/ {} +; \
        rm -f /out/lib/libtorch_python.so; \
    else \
        ldd target/release/aspire-worker | awk '$3 ~ /\/\.venv\// {print $3}' | xargs -r cp -L -t /out/lib/; \
    fi; \
    ls -la /out/lib; \
    for b in /out/bin/*; do \
        if LD_LIBRARY_PATH=/out/lib ldd "$b" | grep 'not found'; then echo "$b: missing libraries" >&2; exit 1; fi; \
    done

FROM ${DEBIAN_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
# apt's lists and package caches go too (a debootstrapped base, unlike Docker Hub's, has no
# docker-clean hook): about 80 MB.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --system --gid 10001 aspire \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin aspire
COPY --from=build /out/lib/ /opt/libtorch/lib/
COPY --from=build /out/bin/ /usr/local/bin/
ENV LD_LIBRARY_PATH=/opt/libtorch/lib
LABEL org.opencontainers.image.title="aspire" \
      org.opencontainers.image.description="Aspire model server: aspire-discovery, aspire-worker, aspire-router, aspirectl" \
      org.opencontainers.image.version="0.1.0" \
      io.aspire.torch-variant="${TORCH_VARIANT}"
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# Each Kubernetes container names its binary in `command`; run alone, the image says what
# it has.
CMD ["aspire-worker", "--help"]
