"""What a completion is worth: text rewards and (reading the policy) internal rewards.

Depends on nothing else in this project.
"""

from .accuracy import MathAccuracy
from .code import CodeAccuracy, extract_output_prediction, extract_program, output_prediction_correct
from .answers import extract_answer, find_answer, normalize_answer
from .base import REGISTRY, Reward, UnknownRewardError, build_reward, completion_text, get_reward_class
from .format import Format
from .clue import Centroids, Clue
from .consistency import LENS_SIGNALS, ConsistencyVote, InternalConsistency, default_layers
from .grading import answers_match, final_answer, grade
from .group import MajorityVote, SemanticCluster, group_rows, plurality
from .internal import SIGNALS, InternalReward, NegativeEntropy, SelfCertainty, SequenceLogProb
from .model import RewardModel
from .perplexity import PerplexityConsistency
from .sandbox import LocalSandbox, Result, Sandbox, Test
from .transform import TransformedReward, with_transform

__all__ = [
    "LENS_SIGNALS",
    "REGISTRY",
    "SIGNALS",
    "Centroids",
    "Clue",
    "CodeAccuracy",
    "ConsistencyVote",
    "LocalSandbox",
    "Result",
    "Sandbox",
    "Test",
    "TransformedReward",
    "with_transform",
    "extract_output_prediction",
    "extract_program",
    "output_prediction_correct",
    "InternalConsistency",
    "default_layers",
    "group_rows",
    "Format",
    "InternalReward",
    "MajorityVote",
    "MathAccuracy",
    "NegativeEntropy",
    "PerplexityConsistency",
    "SelfCertainty",
    "SemanticCluster",
    "SequenceLogProb",
    "plurality",
    "Reward",
    "RewardModel",
    "UnknownRewardError",
    "answers_match",
    "build_reward",
    "completion_text",
    "extract_answer",
    "final_answer",
    "find_answer",
    "normalize_answer",
    "get_reward_class",
    "grade",
]
