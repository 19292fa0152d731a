# The nextturn image for docker-compose. The core has no torch: gateways in front of vLLM stay small.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY nextturn nextturn
COPY gateway gateway
COPY signals signals
COPY trainer trainer
COPY rollout rollout
COPY migrations migrations
# EXTRAS="[ml]" for the trainer (torch, transformers, peft, trl); GPU hosts pass their own TORCH_VERSION.
# Everything else comes from the lock the suite passed with (docs/dependencies.md).
ARG EXTRAS=""
ARG TORCH_VERSION=2.13.0
RUN case "$EXTRAS" in *ml*) pip install --no-cache-dir -c constraints.txt "torch==${TORCH_VERSION}";; esac \
 && pip install --no-cache-dir -c constraints.txt ".${EXTRAS}"
# Not root. /data is the shared volume's mount point: made here and owned by the user, so that a fresh docker
# volume mounted on it starts with that owner (Kubernetes: the pods' fsGroup). Caches go to /tmp (a read-only
# root file system in Kubernetes, with /tmp its own volume).
RUN useradd --uid 10001 --no-create-home nextturn && mkdir /data && chown nextturn /data
ENV HOME=/tmp XDG_CACHE_HOME=/tmp/cache
USER 10001
ENTRYPOINT ["nextturn"]
