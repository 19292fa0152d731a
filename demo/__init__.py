"""``nextturn demo``: the whole loop on one machine, learning measurably from simulated people.

:mod:`~demo.tasks` (the world and the people), :mod:`~demo.base_model` (the small chat
model taught here), :mod:`~demo.users` (people talking through the ``openai`` SDK),
:mod:`~demo.evaluation` (held-out satisfaction, diversity), :mod:`~demo.report` (table,
plot) and :mod:`~demo.runner` (all of it, per method).
"""

METHODS = ("none", "rl", "opd", "combined")  # what `nextturn demo` compares, in the table's order
