# One image for every loranode process (api, indexer, worker, beat, migrate) and the dev chain.
# The build is chosen explicitly, with the torch the tests ran on:
#   CPU (default):  docker build -t loranode:local .                       torch 2.13.0+cpu
#   GPU (CUDA):     docker build -t loranode:gpu --build-arg TORCH_SPEC='torch==2.11.0' \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 .   torch 2.11.0+cu130
# docker-compose.gpu.yml builds the GPU image with those arguments.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --uid 10001 loranode \
 && mkdir -p /data \
 && chown loranode /data

WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error \
 && ln -s /app/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil /usr/local/bin/anvil

COPY pyproject.toml README.md constraints.txt ./
COPY node ./node
# the project's libraries at the versions the tests ran (constraints.txt: scripts/constraints.py writes it);
# torch is pinned by TORCH_SPEC (hadolint's DL3013 reads neither a constraints file nor a build argument)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC" \
 && pip install --no-cache-dir -c constraints.txt -e . "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX"

COPY contracts ./contracts
COPY scripts ./scripts
COPY migrations ./migrations
COPY alembic.ini foundry.toml ./
# the contracts compiled once, here: every process runs as uid 10001 and cannot write /app/build
RUN python -c 'from node.chain.artifacts import load_artifacts; load_artifacts()'

ENV LORANODE_DATA_DIR=/data PYTHONUNBUFFERED=1
USER 10001
VOLUME ["/data"]
ENTRYPOINT ["loranode"]
CMD ["--help"]
