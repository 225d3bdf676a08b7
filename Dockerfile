# blobseal sidecar image: one static Go binary on distroless/static (CA
# certificates, tzdata, /etc/passwd; no shell, no libc, no package manager).
#   docker build --build-arg VERSION=$(git describe --always) -t blobseal .
#   docker run --device /dev/fuse --cap-add SYS_ADMIN \
#     -e EncfsSideCarArgs="$(base64 -w0 config.json)" -v /mnt/remote:/mnt/remote:rshared blobseal
# Multi-arch: docker buildx build --platform linux/amd64,linux/arm64 .
# internal/containertest runs the binary this file builds (the same go build
# line, parsed from here) in an empty root holding only it, the CA bundle
# and /dev/fuse. docs/DEPLOY.md gives the measured size.

FROM --platform=$BUILDPLATFORM golang:1.26-bookworm AS build
ARG TARGETOS=linux
ARG TARGETARCH=amd64
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} go build -trimpath -buildvcs=false -ldflags "-s -w -X main.version=${VERSION}" -o /out/blobseal ./cmd/blobseal

FROM gcr.io/distroless/static-debian12
ARG VERSION=dev
LABEL org.opencontainers.image.title="blobseal" \
      org.opencontainers.image.description="Encrypted ext4 images in Azure Blob Storage, mounted in confidential containers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/blobseal/blobseal"
COPY --from=build /out/blobseal /blobseal
# Root: a FUSE mount without fusermount3 is a mount(2), which needs
# CAP_SYS_ADMIN in the container's user namespace. Commands that do not
# mount (image check, attest, key release) run as any user:
#   docker run --user 65532:65532 blobseal attest ...
USER 0:0
ENTRYPOINT ["/blobseal"]
CMD ["sidecar"]
