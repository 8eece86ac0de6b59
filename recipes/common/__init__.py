"""The recipes' library: what the programs in ``recipes/`` share, and nothing runnable by itself.

Config (schema, loading, checking), the command line every recipe uses, data and prompts, model
and tokenizer loading, training and evaluation plumbing, self-improvement rounds and the
self-verifier's data selection, DeCRED's speech models, dry runs, and the offline tiny world
(``tiny/``). A module a user runs as ``python -m recipes.<name>`` belongs in ``recipes/``, not here.
"""
