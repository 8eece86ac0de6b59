"""Model cards that name the method a model was trained with, through TRL's own card mechanism.

TRL's trainers write ``README.md`` with ``create_model_card`` from three class attributes: ``_name``
(the method), ``_paper`` (``title``, arXiv ``id``, BibTeX ``citation``) and ``_tag_names``.
:class:`ModelCardMixin` sets them for the run (an RLIF run's method is read off its weighted rewards:
self-certainty -> Intuitor, negative entropy -> RENT, majority vote -> TTRL, ...; a trainer for one
method sets them in its class body), lets TRL render its card, then inserts the sections a recipe
hands it in ``card_sections`` (the recipe, the config, the evaluation table) and a table of the
rewards and their weights before TRL's citations. ``save_model`` into ``output_dir`` writes the card
too (``push_to_hub`` already calls ``create_model_card``).

The BibTeX entries are the authors' own, copied from their repositories' READMEs (commit noted).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

PAPERS: dict[str, dict[str, str]] = {
    # sunblaze-ucb/Intuitor@3f0cdd7 README.md
    "intuitor": {"name": "Intuitor", "title": "Learning to Reason without External Rewards", "id": "2505.19590",
                 "citation": textwrap.dedent("""\
                     @article{zhao2025learning,
                       title={Learning to Reason without External Rewards},
                       author={Zhao, Xuandong and Kang, Zhewei and Feng, Aosong and Levine, Sergey and Song, Dawn},
                       journal={arXiv preprint arXiv:2505.19590},
                       year={2025}
                     }""")},
    # satrams/rent-rl@5d4d38a README.md
    "rent": {"name": "RENT", "title": "Maximizing Confidence Alone Improves Reasoning", "id": "2505.22660",
             "citation": textwrap.dedent("""\
                 @article{prabhudesai2025rent,
                     title={Maximizing Confidence Alone Improves Reasoning},
                     author={Prabhudesai, Mihir and Chen, Lili and Ippoliti, Alex and Fragkiadaki, Katerina and Liu, Hao and Pathak, Deepak},
                     journal={arXiv preprint arXiv:2505.22660},
                     year={2025}
                 }""")},
    # PRIME-RL/TTRL@3e2cc93 README.md
    "ttrl": {"name": "TTRL", "title": "TTRL: Test-Time Reinforcement Learning", "id": "2504.16084",
             "citation": textwrap.dedent("""\
                 @article{zuo2025ttrl,
                   title={Ttrl: Test-time reinforcement learning},
                   author={Zuo, Yuxin and Zhang, Kaiyan and Qu, Shang and Sheng, Li and Zhu, Xuekai and Qi, Biqing and Sun, Youbang and Cui, Ganqu and Ding, Ning and Zhou, Bowen},
                   journal={arXiv preprint arXiv:2504.16084},
                   year={2025}
                 }""")},
    # QingyangZhang/EMPO@c5eccd4 readme.md (arXiv link in the same README)
    "empo": {"name": "EMPO", "id": "2504.05812",
             "title": "Right Question is Already Half the Answer: Fully Unsupervised LLM Reasoning Incentivization",
             "citation": textwrap.dedent("""\
                 @article{zhang2025right,
                   title={Right Question is Already Half the Answer: Fully Unsupervised LLM Reasoning Incentivization},
                   author={Zhang, Qingyang and Wu, Haitao and Zhang, Changqing and Zhao, Peilin and Bian, Yatao},
                   journal={Advances in neural information processing systems},
                   year={2025}
                 }""")},
    # zhxieml/internal-consistency@0efbd61 README.md
    "internal_consistency": {
        "name": "internal consistency", "title": "Calibrating Reasoning in Language Models with Internal Consistency",
        "id": "2405.18711", "citation": textwrap.dedent("""\
            @article{xie2024calibrating,
              title={Calibrating Reasoning in Language Models with Internal Consistency},
              author={Xie, Zhihui and Guo, Jizhou and Yu, Tong and Li, Shuai},
              journal={arXiv preprint arXiv:2405.18711},
              year={2024}
            }""")},
    # abaheti95/LoL-RL@9f8d816 README.md (arXiv id of the same paper: 2305.14718)
    "alol": {"name": "A-LoL", "title": "Leftover-Lunch: Advantage-based Offline Reinforcement Learning for Language Models",
             "id": "2305.14718", "citation": textwrap.dedent("""\
                 @inproceedings{
                 baheti2024improving,
                 title={Leftover-Lunch: Advantage-based Offline Reinforcement Learning for Language Models},
                 author={Ashutosh Baheti and Ximing Lu and Faeze Brahman and Ronan Le Bras and Maarten Sap and Mark Riedl},
                 booktitle={The Twelfth International Conference on Learning Representations},
                 year={2024},
                 url={https://openreview.net/forum?id=ZDGKPbF0VQ}
                 }""")},
    # BUTSpeechFIT/DeCRED@c170048 README.md (arXiv badge in the same README)
    "decred": {"name": "DeCRED", "title": "DeCRED: Decoder-Centric Regularization for Encoder-Decoder Based Speech Recognition",
               "id": "2508.08938", "citation": textwrap.dedent("""\
                   @inproceedings{polok2025decred,
                     title        = {{DeCRED}: Decoder-Centric Regularization for Encoder-Decoder Based Speech Recognition},
                     author       = {Polok, Alexander and Kesiraju, Santosh and Bene{\\v s}, Karel and Yusuf, Bolaji and Burget, Luk{\\'a}{\\v s} and {\\v C}ernock{\\'y}, Jan},
                     booktitle    = {2025 IEEE Automatic Speech Recognition and Understanding Workshop (ASRU)},
                     year         = {2025},
                   }""")},
}
"""Paper key -> method name, title, arXiv id and the authors' BibTeX entry."""

REWARD_PAPERS = {"self_certainty": "intuitor", "negative_entropy": "rent", "majority_vote": "ttrl",
                 "semantic_cluster": "empo", "internal_consistency": "internal_consistency",
                 "consistency_vote": "internal_consistency"}
"""Registered reward name -> the paper whose method it is (a weighted reward makes the run that method)."""


def papers_of(rewards: list[tuple[str, float]]) -> list[str]:
    """Paper keys of the weighted (``weight != 0``) rewards, in order, each once.

    >>> papers_of([("self_certainty", 1.0), ("math_accuracy", 0.0), ("negative_entropy", 0.0)])
    ['intuitor']
    >>> papers_of([("math_accuracy", 1.0)])
    []
    """
    keys = [REWARD_PAPERS[name] for name, weight in rewards if weight != 0 and name in REWARD_PAPERS]
    return list(dict.fromkeys(keys))


def card_paper(keys: list[str]) -> tuple[str, dict]:
    """TRL's ``_name`` and ``_paper`` for these papers: the names joined, the first paper's title and id
    (TRL links one), every BibTeX entry (TRL prints them in one ``bibtex`` block)."""
    papers = [PAPERS[k] for k in keys]
    return " + ".join(p["name"] for p in papers), {"title": papers[0]["title"], "id": papers[0]["id"],
                                                   "citation": "\n\n".join(p["citation"] for p in papers)}


def rewards_table(rewards: list[tuple[str, float]]) -> str:
    """Markdown table of the rewards and their weights (weight 0: logged, not optimised).

    >>> print(rewards_table([("self_certainty", 1.0), ("math_accuracy", 0.0)]))
    | reward | weight | paper |
    |---|---|---|
    | self_certainty | 1.0 | Intuitor (arXiv 2505.19590) |
    | math_accuracy | 0.0 (logged only) | - |
    """
    lines = ["| reward | weight | paper |", "|---|---|---|"]
    for name, weight in rewards:
        paper = PAPERS.get(REWARD_PAPERS.get(name, ""))
        cite = f"{paper['name']} (arXiv {paper['id']})" if paper else "-"
        lines.append(f"| {name} | {weight}{' (logged only)' if weight == 0 else ''} | {cite} |")
    return "\n".join(lines)


class ModelCardMixin:
    """Put before the TRL trainer in the bases. ``card_sections``: title -> Markdown, filled by the recipe."""

    card_sections: dict[str, str]

    def card_rewards(self) -> list[tuple[str, float]]:
        """``(name, weight)`` of the rewards this trainer optimises or logs (TRL's GRPO attributes)."""
        funcs, weights = getattr(self, "reward_funcs", None), getattr(self, "reward_weights", None)
        if not funcs or weights is None:
            return []
        names = getattr(self, "reward_func_names", None) or [getattr(f, "__name__", type(f).__name__) for f in funcs]
        return [(name, float(w)) for name, w in zip(names, list(weights))]

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None):
        keys = papers_of(self.card_rewards())
        if keys:  # an instance's attributes: TRL reads them through self
            self._name, self._paper = card_paper(keys)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += ["intrinsic", *[k.replace("_", "-") for k in keys]]
        if model_name is None:
            model_name = (self.args.hub_model_id or Path(self.args.output_dir).name).split("/")[-1]
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = Path(self.args.output_dir) / "README.md"
        sections = dict(getattr(self, "card_sections", None) or {})
        if self.card_rewards():
            sections = {"Rewards": rewards_table(self.card_rewards()), **sections}
        if sections and path.exists():
            extra = "".join(f"\n## {title}\n\n{body.strip()}\n" for title, body in sections.items())
            text = path.read_text()
            at = text.find("\n## Citations")
            path.write_text(text + extra if at < 0 else text[:at] + "\n" + extra + text[at:])

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        here = output_dir is None or os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir)
        if here and not _internal_call:
            self.create_model_card()
