"""ChatFormat.render: a dialog as the text a chat template writes (special tokens as their texts), for
evaluation harnesses, which read text. Read back with the special tokens' texts standing for them, it
is the format's own tokens; without the generation prompt it stops right after the last message."""

from llama.chat.format import Llama2ChatFormat, Llama3ChatFormat
from llama.tokenizer import Tokenizer

DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
]


def test_llama2_text_reads_back_as_its_tokens(tokenizer_path):
    chat = Llama2ChatFormat(Tokenizer(tokenizer_path))
    text = chat.render(DIALOG)
    assert text.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 2? [/INST] 4. </s><s>[INST]")
    assert chat.tokenizer.encode_with_special_tokens(text, legacy=True) == chat.encode_dialog(DIALOG)


def test_llama3_text_reads_back_as_its_tokens(llama3_tokenizer):
    chat = Llama3ChatFormat(Tokenizer(llama3_tokenizer[0]))
    assert chat.tokenizer.encode_with_special_tokens(chat.render(DIALOG)) == chat.encode_dialog(DIALOG)


def test_without_the_generation_prompt_the_text_ends_inside_the_last_answer(tokenizer_path, llama3_tokenizer):
    answered = DIALOG[:3]
    assert (
        Llama2ChatFormat(Tokenizer(tokenizer_path)).render(answered, add_generation_prompt=False).endswith("[/INST] 4.")
    )
    assert (
        Llama3ChatFormat(Tokenizer(llama3_tokenizer[0]))
        .render(answered, add_generation_prompt=False)
        .endswith("<|end_header_id|>\n\n4.")
    )
