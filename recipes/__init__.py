"""Programs: config -> data, model, rewards, trainer -> run.

Every module here is a program, runnable as ``python -m recipes.<name> --config FILE [key=value ...]``
(``--help`` lists its config sections and keys, ``--print-config`` the resolved config) or under
``accelerate launch ... -m recipes.<name>``; ``python -m recipes list`` shows them all. What the
programs share is the library package :mod:`recipes.common`.
"""
