"""Intuitor (RLIF): GRPO on the policy's own self-certainty, no labels (the rlif recipe's configs).

    python -m recipes.intuitor --config configs/intuitor/tiny_arithmetic.yaml
    accelerate launch --config_file launch/accelerate/zero2.yaml -m recipes.intuitor \\
        --config configs/intuitor/qwen2.5-3b_math.yaml
"""

from .common.cli import main
from .rlif import RLIFRecipeConfig, run

if __name__ == "__main__":
    main("intuitor", RLIFRecipeConfig, run)
