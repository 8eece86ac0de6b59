"""How weights change: TRL trainer subclasses and pure loss / signal functions.

Depends on ``rewards`` only.
"""

from .rlif import RLIFConfig, RLIFTrainer

__all__ = ["RLIFConfig", "RLIFTrainer"]
