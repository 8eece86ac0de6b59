"""A character-level tokenizer built in code: one token per printable character.

It is a real :class:`~transformers.PreTrainedTokenizerFast` (BPE with no merges over a
character vocabulary, so every character is one token and digits tokenise one per token),
with ``<pad>``, ``<s>``, ``</s>``, ``<unk>``, role markers and a chat template. It saves and
reloads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any Hub tokenizer.

>>> tok = build_char_tokenizer()
>>> tok.decode(tok("12+34=")["input_ids"])
'12+34='
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n\t"

# Role markers are special tokens; assistant turns end with EOS. The {% generation %} block
# lets TRL/transformers build assistant-only loss masks.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(model_max_length: int = 512, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Build the tiny world's tokenizer (deterministic: same ids on every machine).

    ``vocab_size`` pads the vocabulary with unused tokens ``<w0>``, ``<w1>``, ... (never produced by
    encoding, since BPE has no merges; decoded as their text) up to a real tokenizer's size, so that
    benchmarks can run a real-shaped head (e.g. 151,936 rows) with every row a token.
    """
    specials = [PAD, BOS, EOS, UNK, *ROLES]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    for i in range(max(0, (vocab_size or 0) - len(vocab))):
        vocab[f"<w{i}>"] = len(vocab)
    # No pre-tokenizer: the whole text is one "word" and BPE without merges splits it into
    # characters, keeping spaces and newlines as ordinary tokens.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLES),
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
