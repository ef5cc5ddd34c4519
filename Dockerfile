# One image for every loranode process (api, indexer, worker, beat, migrate) and the dev chain.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error \
 && ln -s /app/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil /usr/local/bin/anvil

# CUDA hosts get the CUDA build of torch; pass --build-arg TORCH_SPEC=torch==2.13.0 for a CPU image.
ARG TORCH_SPEC="torch==2.11.*"
COPY pyproject.toml README.md ./
COPY node ./node
RUN pip install --no-cache-dir "$TORCH_SPEC" && pip install --no-cache-dir -e .

COPY contracts ./contracts
COPY scripts ./scripts
COPY migrations ./migrations
COPY alembic.ini foundry.toml ./

ENV LORANODE_DATA_DIR=/data PYTHONUNBUFFERED=1
VOLUME ["/data"]
ENTRYPOINT ["loranode"]
CMD ["--help"]
