"""The rollout controller: each published version behind a canary that promotes or rolls itself back.

:mod:`rollout.controller` runs the checks (``nextturn rollout run``); :mod:`rollout.gates` holds the rules
as pure functions. The deployment state and its moves are a spine contract (:mod:`nextturn.deployments`),
read by the gateway and the trainer as well. Needs neither torch nor a model.
"""
