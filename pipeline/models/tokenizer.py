"""umT5 tokenizer from a checkpoint's `tokenizer.json`, with the reference's prompt cleaning, and a writer
for small offline tokenizers that the tiny test checkpoints use. Must not need `transformers` or a network.
"""

from __future__ import annotations

import html
import itertools
import re
import string
from collections.abc import Iterator, Sequence
from pathlib import Path

import ftfy
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
TOKENIZER_FILE = "tokenizer.json"
SPACE = "\u2581"  # sentencepiece's word-start marker


def clean_prompt(text: str) -> str:
    """The reference's 'whitespace' cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class Umt5Tokenizer:
    """Prompts -> (ids [B, text_len], mask [B, text_len]) as int64: cleaned, EOS appended, truncated so that
    the EOS survives, padded with the pad id (0)."""

    def __init__(self, tokenizer_dir: str | Path, text_len: int = 512) -> None:
        path = Path(tokenizer_dir) / TOKENIZER_FILE
        if not path.is_file():
            only_spm = (path.parent / "spiece.model").is_file()
            hint = "only spiece.model is there; " if only_spm else ""
            raise FileNotFoundError(
                f"{path}: tokenizer file not found ({hint}the released google/umt5-xxl/ folder has "
                f"{TOKENIZER_FILE}: download it with the checkpoint)"
            )
        if text_len < 1:
            raise ValueError(f"text_len: {text_len}, expected a positive token count (512 for Wan)")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a plain Exception with its parse error
            raise ValueError(f"{path}: not a valid tokenizers JSON file ({exc})") from exc
        self.text_len = text_len
        self.eos_id = self._special_id(EOS, path)
        pad = self.tokenizer.token_to_id(PAD)
        self.pad_id = 0 if pad is None else pad
        # Truncation and EOS are done here, not by the file's post-processor, so that every tokenizer.json
        # gives the reference's result (at most text_len - 1 pieces, then EOS).
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _special_id(self, token: str, path: Path) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{path}: token {token!r} missing from the vocabulary")
        return token_id

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a string or a sequence of strings")
        ids = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.long)
        encodings = self.tokenizer.encode_batch([clean_prompt(t) for t in texts], add_special_tokens=False)
        for row, enc in enumerate(encodings):
            pieces = enc.ids[: self.text_len - 1] + [self.eos_id]
            ids[row, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
            mask[row, : len(pieces)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------------
# Tiny offline tokenizer for tiny checkpoints

_WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "the a an of and to in is on with at by for from as it this that his her their its man woman "
    "person people girl boy child dog cat bird horse car street city sky sea water river tree forest "
    "mountain light sun moon night day rain snow camera video scene shot close up wide slow fast "
    "motion walks runs dances jumps turns looks smiles talks sits stands holds moves flies swims red "
    "blue green white black yellow orange bright dark soft warm cold old young small large big "
    "beautiful cinematic realistic style background foreground face hand hands eyes hair dress shirt "
    "room house window door"
).split()
_SPECIALS = (PAD, EOS, UNK)
MIN_TINY_VOCAB = 8


def _tiny_pieces() -> Iterator[tuple[str, float]]:
    """Pieces in priority order; single characters score low so whole words win the Viterbi search."""
    yield SPACE, -8.0
    for ch in string.ascii_lowercase + string.digits + string.ascii_uppercase + string.punctuation:
        yield ch, -10.0
    for word in _WORDS:
        yield SPACE + word, -4.0
    for ch in string.ascii_lowercase:
        yield SPACE + ch, -7.0
    for pair in itertools.product(string.ascii_lowercase, repeat=2):
        yield "".join(pair), -9.0
    for triple in itertools.product(string.ascii_lowercase, repeat=3):
        yield "".join(triple), -9.5


def write_tiny_tokenizer(dest_dir: str | Path, vocab_size: int) -> Path:
    """Write `dest_dir/tokenizer.json`: a Unigram tokenizer of exactly `vocab_size` pieces with
    `<pad>`=0, `</s>`=1, `<unk>`=2 and a post-processor that appends `</s>`. Returns the file path."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_TINY_VOCAB:
        raise ValueError(f"vocab_size: {vocab_size!r}, expected an integer >= {MIN_TINY_VOCAB}")
    pieces = [(s, 0.0) for s in _SPECIALS] + list(
        itertools.islice(_tiny_pieces(), vocab_size - len(_SPECIALS))
    )
    if len(pieces) != vocab_size:
        raise ValueError(f"vocab_size: {vocab_size}, expected at most {len(pieces)} for the tiny tokenizer")
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / TOKENIZER_FILE
    tok.save(str(path))
    return path
