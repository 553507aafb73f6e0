"""CodeGen's tokenizer on the `tokenizers` library: GPT-2 byte-level BPE plus CodeGen's whitespace-run tokens,
and CodeGen2's fill-in-the-middle tokens where the tokenizer has them."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, TokenizerError

EOS_TOKEN = "<|endoftext|>"
# CodeGen2's fill-in-the-middle (its model card): the prompt is prefix <mask_1> suffix <|endoftext|> <sep>
# <mask_1>, and the model writes the middle after it, ending it with <eom>.
FIM_MASK, FIM_SEP, FIM_EOM = "<mask_1>", "<sep>", "<eom>"


@dataclass(frozen=True)
class FimTokens:
    """The ids of CodeGen2's fill-in-the-middle tokens in a tokenizer."""

    mask: int
    sep: int
    eom: int

    def to_dict(self) -> dict:
        return {"format": "codegen2", FIM_MASK: self.mask, FIM_SEP: self.sep, FIM_EOM: self.eom}


class Tokenizer:
    """Encodes text to ids and back; `end_ids` end generation (`eos_token_id`, and <eom> on a tokenizer that
    can fill in the middle: `fim`)."""

    def __init__(self, backend, eos_token_id: int):
        self._tok = backend
        self.eos_token_id = eos_token_id
        ids = [backend.token_to_id(t) for t in (FIM_MASK, FIM_SEP, FIM_EOM)]
        self.fim = FimTokens(*ids) if None not in ids else None

    def fim_for(self, vocab_size: int) -> FimTokens | None:
        """`fim` where a model of `vocab_size` token ids has rows for the tokens, else None."""
        if self.fim is None or max(self.fim.mask, self.fim.sep, self.fim.eom) >= vocab_size:
            return None
        return self.fim

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def end_ids(self) -> tuple[int, ...]:
        """The ids that end a row: <|endoftext|>, and <eom> (the end of a filled-in middle) where there is one."""
        return (self.eos_token_id,) if self.fim is None else (self.eos_token_id, self.fim.eom)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of what maps text to ids: the vocabulary with its added tokens and the BPE merges. Two
        tokenizers with equal fingerprints give a text the same ids, whichever files they were read from
        (tokenizer.json, or vocab.json + merges.txt); one of the same size with other entries does not."""
        model = json.loads(self._tok.to_str()).get("model", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]  # both JSON forms
        vocab = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda item: (item[1], item[0]))
        body = json.dumps({"vocab": vocab, "merges": merges}, ensure_ascii=False)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def infill(self, prefix: str, suffix: str, middle: str = "") -> list[int]:
        """The fill-in-the-middle prompt of prefix, suffix and what is already typed of the middle (infill_ids).
        Each text is encoded alone, so a prefix encodes the same whatever follows it (its cache is reused while
        the suffix changes); this is what encoding the whole text gives, since special tokens split the text
        first."""
        self._check_fim()
        return self.infill_ids(self.encode(prefix), self.encode(suffix), self.encode(middle))

    def infill_ids(self, prefix: list[int], suffix: list[int], middle: list[int] = ()) -> list[int]:
        """The one fill-in-the-middle layout, CodeGen2's: prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>
        middle, as token ids. InputError on a tokenizer without the tokens (CodeGen1)."""
        self._check_fim()
        mask, sep = self.fim.mask, self.fim.sep
        return [*prefix, mask, *suffix, self.eos_token_id, sep, mask, *middle]

    def _check_fim(self) -> None:
        if self.fim is None:
            raise InputError(
                f"this model cannot fill in the middle: its tokenizer has no {FIM_MASK}, {FIM_SEP} and {FIM_EOM} "
                "tokens (CodeGen2 has them, CodeGen1 does not): leave out the suffix, or use a CodeGen2 model"
            )


def load_tokenizer(path_or_id: str | Path) -> Tokenizer:
    """Load from a folder (or hub id) holding tokenizer.json, or vocab.json + merges.txt [+ added_tokens.json]."""
    from .hub import resolve_model

    folder = resolve_model(path_or_id)
    if (folder / "tokenizer.json").is_file():
        backend = _from_tokenizer_json(folder / "tokenizer.json")
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = _from_vocab_merges(folder)
    elif not any((folder / name).is_file() for name in ("config.json", "manifest.json", "engine.json")):
        raise TokenizerError(
            f"{folder} is not a model folder (no config.json, manifest.json or engine.json): give an export "
            "folder, an engine folder, a checkpoint folder or a hub id"
        )
    else:
        raise TokenizerError(
            f"{folder} has no tokenizer.json and no vocab.json + merges.txt: copy the tokenizer files into it "
            "(or pass --tokenizer FOLDER)"
        )
    eos = backend.token_to_id(EOS_TOKEN)
    if eos is None:
        raise TokenizerError(f"the tokenizer in {folder} has no {EOS_TOKEN} token: is it a CodeGen tokenizer?")
    return Tokenizer(backend, eos)


def _from_tokenizer_json(path: Path):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"{path} is not a readable tokenizer.json ({e}): re-download it") from e


def _from_vocab_merges(folder: Path):
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    try:
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as e:
        raise TokenizerError(f"vocab.json or merges.txt in {folder} is unreadable ({e}): re-download them") from e
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, normalized=False, special=True)])
    added_path = folder / "added_tokens.json"
    if added_path.is_file():
        try:
            added = json.loads(added_path.read_text())
        except ValueError as e:
            raise TokenizerError(f"{added_path} is not valid JSON ({e}): re-download it") from e
        # Added tokens take ids after the base vocab in the order given, so add them sorted by id.
        for content, want in sorted(added.items(), key=lambda kv: kv[1]):
            tok.add_tokens([AddedToken(content, normalized=True, special=False)])
            got = tok.token_to_id(content)
            if got != want:
                raise TokenizerError(f"{added_path}: token {content!r} should have id {want} but got {got}")
    return tok
