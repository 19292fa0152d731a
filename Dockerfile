# The nextturn image for docker-compose. The core has no torch: gateways in front of vLLM stay small.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY nextturn nextturn
COPY gateway gateway
COPY signals signals
COPY trainer trainer
COPY migrations migrations
# EXTRAS="[ml]" for the trainer (torch, transformers, peft, trl); GPU hosts pass their own torch build.
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS}"
ENTRYPOINT ["nextturn"]
