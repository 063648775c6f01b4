"""The tokenizer.json written for a sentencepiece model (llama.checkpoints.hf_tokenizer_files): transformers'
AutoTokenizer encodes and decodes as sentencepiece itself under each normalizer setting a model may
have, the settings read from the model as the protobuf package reads them."""

import logging
from pathlib import Path

import pytest
import sentencepiece as spm

from conftest import BUNDLED_TOKENIZER, stdlib_lines
from llama.checkpoints.hf_tokenizer_files import NormalizerSpec, write_hf_tokenizer_files
from llama.tokenizer import Tokenizer, train_tokenizer

# what the settings act on: spaces at the ends and in runs, tabs and newlines, characters NFKC maps,
# characters only bytes encode, and the empty text
TEXTS = [
    "import os\n",
    "def f(x):  return x",
    "  héllo\nwörld",
    " a leading space",
    "",
    "   ",
    "x\n\n  y ",
    "\n  x",
    "a\tb  \t c",
    "ｆｕｌｌ ﬁne ①② ™ \u00a0a\u3000b",
    "e\u0301 café 中文 ✓ 🙂",
    "trailing   ",
]
IDENTITY = {"normalization_rule_name": "identity"}
SETTINGS = {  # name -> sentencepiece trainer options (sentencepiece's defaults otherwise), or None: the bundled model
    "the bundled model: nothing added or removed": None,
    "Llama 2: a dummy prefix": {**IDENTITY, "remove_extra_whitespaces": False},
    "sentencepiece's defaults: NFKC, spaces removed at the ends and in runs, a dummy prefix": {},
    "spaces removed, no dummy prefix": {**IDENTITY, "add_dummy_prefix": False},
}
UNESCAPED = "spaces not escaped, a dummy prefix"  # made from Llama 2's settings: sentencepiece's BPE trainer refuses it
NAMES = [*SETTINGS, UNESCAPED]


def train(options: dict) -> bytes:
    return train_tokenizer(stdlib_lines(3000) + TEXTS, 400, keep_whitespace=False, **options)


def unescaped(model: bytes) -> bytes:
    """The model with escape_whitespaces false (sentencepiece's BPE trainer refuses to make one)."""
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    proto.normalizer_spec.escape_whitespaces = False
    return proto.SerializeToString()


def write_folder(model: bytes, folder: Path) -> Tokenizer:
    """The model as tokenizer.model in folder/source, its Hugging Face tokenizer files in folder/hf."""
    (folder / "source").mkdir(parents=True)
    (folder / "hf").mkdir()
    (folder / "source" / "tokenizer.model").write_bytes(model)
    tokenizer = Tokenizer(str(folder / "source" / "tokenizer.model"))
    write_hf_tokenizer_files(tokenizer, folder / "hf", max_position_embeddings=256)
    return tokenizer


@pytest.fixture(scope="module")
def model():
    """model(name) -> the serialized sentencepiece model of one of NAMES, made once."""
    made = {}

    def make(name: str) -> bytes:
        if name not in made:
            if name == UNESCAPED:
                made[name] = unescaped(train(SETTINGS["Llama 2: a dummy prefix"]))
            else:
                made[name] = BUNDLED_TOKENIZER.read_bytes() if SETTINGS[name] is None else train(SETTINGS[name])
        return made[name]

    return make


@pytest.fixture
def tokenizers(model, tmp_path):
    """tokenizers(name) -> (sentencepiece's own processor, transformers' AutoTokenizer of the written files)."""
    from transformers import AutoTokenizer

    def load(name: str):
        write_folder(model(name), tmp_path / "tokenizer")
        theirs = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer" / "hf"))
        return spm.SentencePieceProcessor(model_proto=model(name)), theirs

    return load


def sample_texts():
    return TEXTS + ["\n".join(stdlib_lines(3400)[3000:])]  # source the models were not trained on


@pytest.mark.parametrize("name", NAMES)
def test_transformers_encodes_as_sentencepiece(tokenizers, name):
    sp, theirs = tokenizers(name)
    texts = sample_texts()
    assert [theirs(text)["input_ids"] for text in texts] == [[sp.bos_id()] + sp.encode(text) for text in texts]


@pytest.mark.parametrize("name", NAMES)
def test_transformers_decodes_as_sentencepiece(tokenizers, name):
    """Each encoded text, and each continuation of a short one from a piece on (as generated tokens are decoded)."""
    sp, theirs = tokenizers(name)
    for text in sample_texts():
        ids = sp.encode(text)
        assert theirs.decode([sp.bos_id()] + ids, skip_special_tokens=True) == sp.decode(ids)
    for text in TEXTS:
        ids = sp.encode(text)
        # from a byte piece on, part of a character may come first, which each turns into U+FFFD its own way
        starts = [i for i in range(len(ids)) if not sp.IsByte(ids[i])]
        theirs_decoded = [theirs.decode(ids[i:], skip_special_tokens=True) for i in starts]
        assert theirs_decoded == [sp.decode(ids[i:]) for i in starts]


@pytest.mark.parametrize("name", NAMES)
def test_normalizer_settings_are_read_as_protobuf_reads_them(model, name, tmp_path):
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(model(name))
    spec = NormalizerSpec.of(write_folder(model(name), tmp_path))
    normalizer = proto.normalizer_spec
    assert spec == NormalizerSpec(
        precompiled_charsmap=normalizer.precompiled_charsmap,
        add_dummy_prefix=normalizer.add_dummy_prefix,
        remove_extra_whitespaces=normalizer.remove_extra_whitespaces,
        escape_whitespaces=normalizer.escape_whitespaces,
        treat_whitespace_as_suffix=proto.trainer_spec.treat_whitespace_as_suffix,
        denormalizer_charsmap=proto.denormalizer_spec.precompiled_charsmap,
    )


def test_the_bundled_model_reads_as_adding_no_dummy_prefix(tmp_path):
    spec = NormalizerSpec.of(write_folder(BUNDLED_TOKENIZER.read_bytes(), tmp_path))
    assert (spec.add_dummy_prefix, spec.remove_extra_whitespaces, spec.precompiled_charsmap) == (False, False, b"")


def test_only_a_setting_tokenizer_json_cannot_hold_is_warned(model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llama.checkpoints.hf_tokenizer_files"):
        for i, name in enumerate(SETTINGS):
            write_folder(model(name), tmp_path / str(i))
        assert caplog.records == []
        write_folder(train({**IDENTITY, "treat_whitespace_as_suffix": True}), tmp_path / "suffix")
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{tmp_path / 'suffix' / 'hf' / 'tokenizer.json'}: the sentencepiece model's treat_whitespace_as_suffix "
        "(spaces end pieces instead of starting them) cannot be written in tokenizer.json: transformers will encode "
        "or decode some texts otherwise than sentencepiece"
    )
