# nbd-export as a container sidecar: serves the image mounted at /disk.
#   docker build -t nbd-export .
#   docker run -p 10809:10809 -v $PWD/disk.img:/disk nbd-export
FROM node:20-bookworm-slim
WORKDIR /opt/nbd-export
COPY package.json package-lock.json ./
RUN npm ci --omit=dev && npm cache clean --force
COPY bin ./bin
COPY src ./src
COPY tsconfig.json ./
EXPOSE 10809
USER node
ENTRYPOINT ["/opt/nbd-export/bin/nbd-export"]
CMD ["--persistent", "--shared", "0", "-f", "raw", "/disk"]
