"""``nextturn demo``: the whole loop on one machine, learning measurably from simulated people.

:mod:`~nextturn.demo.tasks` (the world and the people), :mod:`~nextturn.demo.base_model` (the small chat
model taught here), :mod:`~nextturn.demo.users` (people talking through the ``openai`` SDK),
:mod:`~nextturn.demo.evaluation` (held-out satisfaction, diversity), :mod:`~nextturn.demo.report` (table,
plot) and :mod:`~nextturn.demo.runner` (all of it, per method).
"""
