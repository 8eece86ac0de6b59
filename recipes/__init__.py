"""Programs: config -> data, model, rewards, trainer -> run.

Every recipe is a module runnable as ``python -m recipes.<name> --config FILE [key=value ...]``
or under ``accelerate launch ... -m recipes.<name>``; ``python -m recipes list`` shows them all.
"""
