"""How weights change: TRL trainer subclasses and pure loss / signal functions.

Depends on ``rewards`` only.
"""

from .alol import VARIANTS as ALOL_VARIANTS
from .alol import AdvantageSampler, ALoLConfig, ALoLTrainer, alol_loss
from .rlif import RLIFConfig, RLIFTrainer
from .value_head import ValueHead

__all__ = ["ALOL_VARIANTS", "ALoLConfig", "ALoLTrainer", "AdvantageSampler", "RLIFConfig", "RLIFTrainer", "ValueHead",
           "alol_loss"]
