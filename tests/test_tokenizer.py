from transformers import AutoTokenizer, PreTrainedTokenizerBase

from recipes.common.tiny.tokenizer import CHARACTERS, build_char_tokenizer


def test_round_trip_every_character():
    tok = build_char_tokenizer()
    text = CHARACTERS + "12+34=46\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character, digits included
    assert tok.decode(ids) == text


def test_special_tokens_are_distinct_and_skippable():
    tok = build_char_tokenizer()
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert len(specials) == 4 and None not in specials
    ids = [tok.bos_token_id, *tok("7", add_special_tokens=False)["input_ids"], tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "7"
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_chat_template_and_assistant_mask():
    tok = build_char_tokenizer()
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1="}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>s\n<|user|>1+1=\n<|assistant|>"
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": "2"}], tokenize=True,
                                   return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(full["input_ids"], full["assistant_masks"]) if m]
    assert tok.decode(masked) == "2</s>"


def test_save_and_reload_with_auto_tokenizer(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerBase)
    text = "hello, 42!"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token) == ("<pad>", "</s>", "<s>")
    assert loaded.chat_template == tok.chat_template
    assert loaded.padding_side == "left"
