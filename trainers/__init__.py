"""How weights change: TRL trainer subclasses and pure loss / signal functions.

Depends on ``rewards`` only.
"""
