"""SentencePiece tokenizers (``tokenizer.model``: Llama / Vicuna, the original LLaVA releases,
mPLUG-Owl and -Owl2, InternLM2), with the ids of transformers' slow ``LlamaTokenizer``.

What the slow tokenizer does, and this one too:
- the text is split at added tokens (``added_tokens_decoder``; special ones only outside the
  protected ranges: message content never becomes a control token);
- ``legacy: true`` (the default, and transformers before 4.31): every piece between added tokens
  is encoded by SentencePiece with its own dummy prefix ``▁``;
- ``legacy: false``: ``▁`` is put only at the very start of the text (``add_prefix_space``),
  SentencePiece's dummy prefix is off, a piece starting with a space is encoded behind ``<unk>``
  (so the space is kept), and a lone ``▁`` before a leading special token is dropped.
Offsets come from SentencePiece's own (byte) spans, turned into character positions.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from modalign.data.tokenizer import Tokenizer, _overlaps, _token_str

UNDERLINE = "\u2581"


class _Added:
    def __init__(self, d: dict):
        self.content, self.special = d["content"], bool(d.get("special", False))
        self.lstrip, self.rstrip = bool(d.get("lstrip", False)), bool(d.get("rstrip", False))


class SentencePieceTokenizer(Tokenizer):
    """A ``tokenizer.model`` with the special tokens and chat template of its checkpoint."""

    def __init__(self, model_file: str | Path, config: dict | None = None, template_name: str | None = None):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        cfg = dict(config or {})
        self.model_file = Path(model_file)
        self.legacy = cfg.get("legacy")
        self.legacy = True if self.legacy is None else bool(self.legacy)
        self.add_prefix_space = bool(cfg.get("add_prefix_space", True))
        self.add_bos = bool(cfg.get("add_bos_token", True))
        proto = pb.ModelProto()
        proto.ParseFromString(self.model_file.read_bytes())
        if not self.legacy:  # as transformers' get_spm_processor: the prefix is added by hand
            proto.normalizer_spec.add_dummy_prefix = False
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._config = cfg
        added = {int(i): _Added(d) for i, d in (cfg.get("added_tokens_decoder") or {}).items()}
        for name in ("unk_token", "bos_token", "eos_token", "pad_token"):  # special_tokens_map style
            tok = _token_str(cfg.get(name))
            if tok and tok not in {a.content for a in added.values()}:
                pid = self.sp.piece_to_id(tok)
                if self.sp.id_to_piece(pid) == tok:
                    added[pid] = _Added({"content": tok, "special": True})
        self.added = added
        self._ids = {a.content: i for i, a in added.items()}
        self.unk_token = _token_str(cfg.get("unk_token")) or "<unk>"
        self._unk_len = len(self.sp.encode(self.unk_token, out_type=str))
        self._added_re = (
            re.compile("|".join(re.escape(c) for c in sorted(self._ids, key=len, reverse=True)))
            if self._ids
            else None
        )
        self.template_name = template_name or cfg.get("modalign_template")
        self.bos_token, self.eos_token = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        self.pad_token, self.image_token = (
            _token_str(cfg.get("pad_token")),
            _token_str(cfg.get("image_token")),
        )
        self.chat_template = cfg.get("chat_template")
        self.special_ids = {i for i, a in added.items() if a.special}
        self._specials = {a.content: a for a in added.values() if a.special}
        self._special_re = self._added_re

    # ------------------------------------------------------------------ ids

    def token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if token in self._ids:
            return self._ids[token]
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    @property
    def vocab_size(self) -> int:
        return max(len(self.sp), max(self.added, default=-1) + 1)

    def encode(self, text: str) -> list[int]:
        return self.encode_offsets(text)[0]

    def encode_offsets(self, text: str, protected=None) -> tuple[list[int], list[tuple[int, int]]]:
        """As the slow tokenizer's ``tokenize`` (see the module docstring), with character offsets."""
        if not self.legacy:
            text = text.replace(UNDERLINE, " ")
        ids, offs, cut = [], [], 0
        matches = [] if self._added_re is None else list(self._added_re.finditer(text))
        for m in matches:
            tok = self.added[self._ids[m.group()]]
            if tok.special and protected and _overlaps(m.start(), m.end(), protected):
                continue  # text a user wrote
            start, end = m.start(), m.end()
            if tok.lstrip:
                while start > cut and text[start - 1].isspace():
                    start -= 1
            if tok.rstrip:
                while end < len(text) and text[end].isspace():
                    end += 1
            self._encode_piece(text, cut, start, ids, offs)
            ids.append(self._ids[m.group()])
            offs.append((m.start(), m.end()))
            cut = end
        self._encode_piece(text, cut, len(text), ids, offs)
        if not self.legacy and len(ids) > 1 and ids[0] == self._lone_prefix() and ids[1] in self.special_ids:
            ids, offs = ids[1:], offs[1:]  # "▁" before a leading special token
        return ids, offs

    def _lone_prefix(self) -> int:
        return self.sp.piece_to_id(UNDERLINE)

    def _encode_piece(self, text: str, a: int, b: int, ids: list, offs: list) -> None:
        chunk = text[a:b]
        prefix = 0
        if not self.legacy:
            if a == 0 and self.add_prefix_space and text:
                chunk, prefix = UNDERLINE + chunk, 1
            if not chunk:
                return
            if chunk.startswith((UNDERLINE, " ")):  # behind <unk>, so that the leading space stays
                self._sp_pieces(
                    self.unk_token + chunk, len(self.unk_token) + prefix, a, b, ids, offs, self._unk_len
                )
                return
        elif not chunk:
            return
        self._sp_pieces(chunk, prefix, a, b, ids, offs, 0)

    def _sp_pieces(self, s: str, shift: int, a: int, b: int, ids: list, offs: list, drop: int) -> None:
        """SentencePiece on ``s`` (the text from ``a`` preceded by ``shift`` characters of its own)."""
        proto = self.sp.encode(s, return_type="proto")
        raw = s.encode("utf-8")
        char_at = _byte_to_char(raw)
        for p in list(proto.pieces)[drop:]:
            x = max(char_at[p.begin] - shift, 0) + a
            y = max(char_at[p.end] - shift, 0) + a
            ids.append(p.id)
            offs.append((min(x, b), min(y, b)))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [i for i in ids if i >= 0]
        out, run, first = [], [], True
        for i in ids:
            if i in self.added and (self.added[i].special or i >= len(self.sp)):
                if skip_special_tokens and self.added[i].special:
                    continue
                out.append(self._decode_run(run, first))
                out.append(self.added[i].content)
                run, first = [], False
            else:
                run.append(i)
        out.append(self._decode_run(run, first))
        return "".join(out)

    def _decode_run(self, run: list[int], first: bool) -> str:
        if not run:
            return ""
        pieces = [self.sp.id_to_piece(i) for i in run]
        if first and self.add_prefix_space and pieces[0].startswith(UNDERLINE):
            pieces[0] = pieces[0][1:]  # the prefix of the text (SentencePiece drops its own dummy one)
        return self.sp.decode_pieces(pieces)

    def add_special_token(self, content: str) -> int:
        """Add a special token after the last id (``added_tokens_decoder``, as transformers
        writes it) and return its id (an existing token's id if it is already there)."""
        have = self.token_id(content)
        if have is not None:
            return have
        new = self.vocab_size
        entry = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}  # fmt: skip
        self._config["added_tokens_decoder"] = dict(self._config.get("added_tokens_decoder") or {}) | {
            str(new): entry
        }
        self.added[new] = _Added(entry)
        self._ids[content] = new
        self.special_ids.add(new)
        self._specials[content] = self.added[new]
        self._added_re = self._special_re = re.compile(
            "|".join(re.escape(c) for c in sorted(self._ids, key=len, reverse=True))
        )
        return new

    # ------------------------------------------------------------------ files

    @classmethod
    def from_dir(cls, path: str | Path, config: dict) -> SentencePieceTokenizer:
        return cls(Path(path) / "tokenizer.model", config)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.model_file.resolve() != (path / "tokenizer.model").resolve():
            shutil.copy(self.model_file, path / "tokenizer.model")
        cfg = dict(self._config) | {"chat_template": self.chat_template, "modalign_template": self.template_name,
                                    "legacy": self.legacy}  # fmt: skip
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _byte_to_char(raw: bytes) -> list[int]:
    """For each byte offset 0..len(raw) of UTF-8 text, the index of the character it falls in (the
    end, len(raw), maps to the number of characters)."""
    out, ch = [], -1
    for byte in raw:
        ch += byte & 0xC0 != 0x80  # a byte that is not a continuation starts a character
        out.append(ch)
    out.append(ch + 1)
    return out
