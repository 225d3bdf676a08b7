# blobseal sidecar image: a static Go binary plus what FUSE needs.
#   docker build -t blobseal .
#   docker run --device /dev/fuse --cap-add SYS_ADMIN \
#     -e EncfsSideCarArgs="$(base64 -w0 config.json)" -v /mnt/remote:/mnt/remote:rshared blobseal
# See README.md ("Running the container") for when the capability is needed.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/blobseal ./cmd/blobseal

FROM alpine:3.20
# fuse3 provides fusermount3 for unprivileged mounts; ca-certificates for
# Azure endpoints. Nothing else: no cryptsetup, no kernel modules.
RUN apk add --no-cache fuse3 ca-certificates \
 && echo user_allow_other >> /etc/fuse.conf
COPY --from=build /out/blobseal /usr/local/bin/blobseal
ENTRYPOINT ["/usr/local/bin/blobseal"]
CMD ["sidecar"]
