"""CLIP tokenizer against transformers' CLIPTokenizer, on a vocabulary trained here."""

from __future__ import annotations

import json
import random

import pytest
import torch

from latentdiff.models.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    CLIPTokenizer,
    TokenizerError,
    bytes_to_unicode,
    train_clip_bpe,
)

transformers = pytest.importorskip("transformers")

SYLLABLES = ["ka", "to", "ri", "ne", "mo", "sha", "lu", "pe", "vi", "dra", "gon", "el", "an", "qu", "ix", "ber", "st"]
WORDS = ("a photo of the cat dog red blue green circle square triangle painting by artist trending on "
         "artstation highly detailed masterpiece portrait landscape sunset over mountains").split()
EXTRAS = ["café", "naïve", "Ünïcödé", "東京タワー", "夜の街", "🐱", "🚀✨", "ß", "Ελληνικά", "русский",
          "1234", "3.14", "(word:1.2)", "[bracket]", "don't", "it's", "we'll", "!!!", "...", "#tag", "e-mail"]


def _corpus(lines: int = 600) -> list[str]:
    rng = random.Random(0)
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(4, 14)):
            roll = rng.random()
            if roll < 0.45:
                parts.append(rng.choice(WORDS))
            elif roll < 0.85:
                parts.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(rng.choice(EXTRAS))
        out.append(" ".join(parts).capitalize() + rng.choice([".", "!", "?", ",", ""]))
    return out


TEST_STRINGS = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "a photo of a cat, trending on artstation, highly detailed!!!",
    "hello,world;foo:bar",
    "(red fox:1.2), [dog], ((masterpiece)), {best quality}",
    "(word:1.2) (word) [word]",
    "1234567890 3.14159 1st 2nd 100%",
    "price: $19.99 -- 50% off!",
    "café naïve résumé Ünïcödé",
    "cafe\u0301 (combining accent, NFC)",
    "東京タワー 夜の街",
    "emoji 🐱🚀✨ and 👩‍👩‍👧",
    "Ελληνικά и русский текст",
    "multiple    spaces   between",
    "new\nlines\n\nand\ttabs\r\n",
    "   leading and trailing   ",
    "don't it's we'll they're I'm you've he'd",
    "DON'T IT'S",
    "quotes \"double\" 'single' `back`",
    "email me at someone@example.com or http://x.org/a?b=c",
    "#hashtag @mention &amp; <html>",
    "<|startoftext|> and <|endoftext|> in text",
    "kaberst dragonix quelu shamope",
    "ß straße STRASSE",
    "ﬁ ligature and ① circled",
    "zero\u200bwidth",
    "tab\tand non\u00a0breaking space",
    "a " * 100,  # longer than 77 tokens: truncated, end token kept last
    " ".join(_corpus(3)) * 3,
    "...!!!???,,,",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tokenizer = train_clip_bpe(_corpus(), vocab_size=2000)
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    tokenizer.save(folder)
    return tokenizer, folder


def _hf_ids(hf, text: str, length: int = 77) -> list[int]:
    return hf(text, padding="max_length", max_length=length, truncation=True)["input_ids"]


def test_vocab_layout(trained):
    tokenizer, _ = trained
    assert tokenizer.vocab_size == 2000
    base = list(bytes_to_unicode().values())
    by_id = sorted(tokenizer.vocab, key=tokenizer.vocab.__getitem__)
    assert by_id[:256] == base
    assert by_id[256:512] == [c + "</w>" for c in base]
    assert by_id[512:-2] == list(dict.fromkeys(a + b for a, b in tokenizer.merges))
    assert by_id[-2:] == [BOS_TOKEN, EOS_TOKEN]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1998, 1999, 1999)
    assert tokenizer.model_max_length == 77


def test_same_ids_as_transformers(trained):
    tokenizer, folder = trained
    ours = CLIPTokenizer.from_folder(folder)
    hf = transformers.CLIPTokenizer.from_pretrained(folder)
    assert len(TEST_STRINGS) >= 30
    batch = ours(TEST_STRINGS)
    assert batch.shape == (len(TEST_STRINGS), 77) and batch.dtype == torch.long
    assert torch.equal(batch, tokenizer(TEST_STRINGS))
    for row, text in zip(batch.tolist(), TEST_STRINGS):
        assert row == _hf_ids(hf, text), text
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours(text, max_length=20)[0].tolist() == _hf_ids(hf, text, 20), text


def test_padding_and_truncation(trained):
    tokenizer, _ = trained
    empty = tokenizer("")[0].tolist()
    assert empty == [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * 76
    long = tokenizer("a " * 100)[0].tolist()
    assert len(long) == 77 and long[0] == tokenizer.bos_token_id and long[-1] == tokenizer.eos_token_id
    assert long[1:-1] == tokenizer.encode("a " * 100)[:75]
    assert tokenizer.decode(tokenizer.encode("a photo of a cat")) == "a photo of a cat"


@pytest.mark.parametrize("where", ["both", "config_only", "map_only"])
def test_pad_token_from_config(trained, tmp_path, where):
    tokenizer, folder = trained
    # SD 2.x style: pad with "!", written as an AddedToken dict. When the two files
    # disagree, special_tokens_map.json wins, as in transformers.
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = json.loads((folder / "special_tokens_map.json").read_text())
    pad = {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    if where in ("both", "config_only"):
        config["pad_token"] = pad
    if where in ("both", "map_only"):
        special["pad_token"] = pad
    config["model_max_length"] = 40
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    ours = CLIPTokenizer.from_folder(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    expected = tokenizer.eos_token_id if where == "config_only" else tokenizer.vocab["!"]
    assert ours.pad_token_id == expected == hf.pad_token_id
    assert ours.model_max_length == 40 == hf.model_max_length
    assert ours("a cat")[0].tolist() == _hf_ids(hf, "a cat", 40)


def test_tokenizer_json_from_transformers5(trained, tmp_path):
    _, folder = trained
    hf = transformers.CLIPTokenizer.from_pretrained(folder)
    hf.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):  # force the tokenizer.json path
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    ours = CLIPTokenizer.from_folder(tmp_path)
    hf5 = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    for text in TEST_STRINGS:
        assert ours(text)[0].tolist() == _hf_ids(hf5, text) == _hf_ids(hf, text), text


def test_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        CLIPTokenizer.from_folder(tmp_path / "nope")
    with pytest.raises(TokenizerError, match=r"missing vocab.json and merges.txt") as err:
        CLIPTokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match="missing merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)


def test_corrupt_files(trained, tmp_path):
    _, folder = trained
    (tmp_path / "merges.txt").write_bytes((folder / "merges.txt").read_bytes())
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": ')
    with pytest.raises(TokenizerError, match=r"corrupt tokenizer file vocab.json") as err:
        CLIPTokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "vocab.json").write_text('["not", "a", "map"]')
    with pytest.raises(TokenizerError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_bytes((folder / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_bytes((folder / "merges.txt").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerError, match="corrupt tokenizer file tokenizer.json"):
        CLIPTokenizer.from_folder(tmp_path)


def test_train_is_deterministic_and_validates():
    corpus = _corpus(50)
    a, b = train_clip_bpe(corpus, 700), train_clip_bpe(corpus, 700)
    assert a.merges == b.merges and a.vocab == b.vocab
    with pytest.raises(ValueError, match="vocab_size"):
        train_clip_bpe(corpus, 100)


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def test_sd15_style_special_tokens(trained, tmp_path):
    """SD 1.5's tokenizer files: AddedToken dicts with normalized=true, pad as a plain string."""
    _, folder = trained
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    special = {"bos_token": _added(BOS_TOKEN), "eos_token": _added(EOS_TOKEN),
               "unk_token": _added(EOS_TOKEN), "pad_token": EOS_TOKEN}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", **special}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = CLIPTokenizer.from_folder(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    texts = TEST_STRINGS + ["<|ENDOFTEXT|>", "<|StartOfText|>a", "x<|endoftext|>y", "a  <|EndOfText|> b"]
    for text in texts:
        assert ours(text)[0].tolist() == _hf_ids(hf, text), text
    # What we save reloads in transformers with the same matching rules.
    ours.save(tmp_path / "resaved")
    again = transformers.CLIPTokenizer.from_pretrained(tmp_path / "resaved")
    for text in texts:
        assert CLIPTokenizer.from_folder(tmp_path / "resaved")(text)[0].tolist() == _hf_ids(again, text), text
        assert _hf_ids(again, text) == _hf_ids(hf, text), text
