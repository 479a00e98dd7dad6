"""umT5 tokenizer wrapper and the tiny offline tokenizer: cleaning rules, EOS, padding, truncation, round
trips. Must not need the network or the real 256k-piece tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from pipeline.models.tokenizer import TOKENIZER_FILE, Umt5Tokenizer, clean_prompt, write_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("umt5")
    write_tiny_tokenizer(directory, 384)
    return directory


def test_cleaning_follows_the_reference_rules() -> None:
    assert clean_prompt("  a \n\t man\u3000walks  ") == "a man walks"  # any whitespace run -> one space
    assert clean_prompt("rock &amp;amp; roll &lt;3") == "rock & roll <3"  # html unescaped twice
    assert clean_prompt("caf\u00c3\u00a9 fa\u00c3\u00a7ade") == "caf\u00e9 fa\u00e7ade"  # ftfy mojibake fix
    assert clean_prompt("\u201cquoted\u201d") == '"quoted"'  # ftfy uncurls quotes
    assert clean_prompt("   ") == ""


def test_tiny_tokenizer_file_is_valid_and_sized(tiny_dir: Path) -> None:
    raw = Tokenizer.from_file(str(tiny_dir / TOKENIZER_FILE))
    assert raw.get_vocab_size(with_added_tokens=True) == 384
    assert [raw.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    # Its own post-processor appends </s>, like the real umT5 tokenizer.json.
    assert raw.encode("the dog").ids[-1] == 1
    assert json.loads((tiny_dir / TOKENIZER_FILE).read_text())["model"]["type"] == "Unigram"


@pytest.mark.parametrize("size", [16, 100, 1000])
def test_tiny_tokenizer_vocab_size_is_configurable(tmp_path: Path, size: int) -> None:
    write_tiny_tokenizer(tmp_path, size)
    tok = Umt5Tokenizer(tmp_path, text_len=64)
    assert tok.vocab_size == size
    ids, _ = tok(["The quick brown fox jumps over the lazy dog 123!"])
    assert int(ids.max()) < size


def test_round_trip_eos_and_padding(tiny_dir: Path) -> None:
    tok = Umt5Tokenizer(tiny_dir, text_len=32)
    ids, mask = tok(["A man walks in the city.", "  hello,   World  "])
    assert ids.shape == mask.shape == (2, 32)
    for row in range(2):
        n = int(mask[row].sum())
        assert ids[row, n - 1] == tok.eos_id == 1  # EOS closes every prompt
        assert (ids[row, n:] == 0).all() and (mask[row, n:] == 0).all()  # pad id 0 after it
        assert (mask[row, :n] == 1).all()
    assert tok.decode(ids[0].tolist()) == "A man walks in the city."
    assert tok.decode(ids[1].tolist()) == "hello, World"


def test_truncation_keeps_eos(tiny_dir: Path) -> None:
    tok = Umt5Tokenizer(tiny_dir, text_len=8)
    ids, mask = tok("one two three four five six seven eight nine ten")
    assert mask.sum() == 8 and ids[0, -1] == 1
    full, _ = Umt5Tokenizer(tiny_dir, text_len=64)("one two three four five six seven eight nine ten")
    assert ids[0, :7].tolist() == full[0, :7].tolist()


def test_empty_prompt_is_eos_only_and_unknown_chars_map_to_unk(tiny_dir: Path) -> None:
    tok = Umt5Tokenizer(tiny_dir, text_len=8)
    ids, mask = tok(["", "\u6f22"])
    assert ids[0].tolist() == [1] + [0] * 7 and mask[0].sum() == 1
    assert 2 in ids[1].tolist()


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json: tokenizer file not found"):
        Umt5Tokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only spiece.model is there"):
        Umt5Tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size: 3, expected an integer >= 8"):
        write_tiny_tokenizer(tmp_path, 3)
    (tmp_path / TOKENIZER_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON file"):
        Umt5Tokenizer(tmp_path)
