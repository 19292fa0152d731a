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
ENTRYPOINT ["nextturn"]
