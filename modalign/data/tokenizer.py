"""Tokenizers via the ``tokenizers`` library: load a checkpoint's ``tokenizer.json`` (+
``tokenizer_config.json`` special tokens and chat template), or train a byte-level BPE for
from-scratch models. Encoding never adds special tokens by itself: templates write them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# special tokens of the byte-level BPE that modalign trains (ids in this order)
DEFAULT_SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]


def _overlaps(a: int, b: int, ranges) -> bool:
    return any(a < y and b > x for x, y in ranges)


def read_tokenizer_config(path: Path) -> dict:
    """``tokenizer_config.json`` with the special tokens of ``special_tokens_map.json`` where it
    lacks them and the chat template of ``chat_template.jinja`` (or the default of named ones)."""
    cfg = {}
    if (path / "tokenizer_config.json").is_file():
        cfg = json.loads((path / "tokenizer_config.json").read_text())
    if (path / "special_tokens_map.json").is_file():
        for k, v in json.loads((path / "special_tokens_map.json").read_text()).items():
            cfg.setdefault(k, v)
    template = cfg.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next(
            (t["template"] for t in template if t.get("name") == "default"), template[0]["template"]
        )
    cfg["chat_template"] = template
    return cfg


def _token_str(v) -> str | None:
    if v is None:
        return None
    return v["content"] if isinstance(v, dict) else str(v)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special tokens and chat template of a checkpoint."""

    def __init__(
        self,
        tk: _HFTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        image_token: str | None = None,
        chat_template: str | None = None,
        template_name: str | None = None,
    ):
        self.tk = tk
        self.source_config: dict = {}  # the tokenizer_config.json read; ``save`` keeps the keys it does not own
        self.template_name = template_name  # the built-in template a model was trained with
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.image_token = pad_token, image_token
        self.chat_template = chat_template
        added = tk.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        # the strings that are read as one added token: special ones, and added ones marked not
        # special (Qwen's <tool_call>, <think>): in message content both are text
        self._specials = {t.content: t for t in added.values() if t.content}
        self._special_re = (
            re.compile("|".join(re.escape(c) for c in sorted(self._specials, key=len, reverse=True)))
            if self._specials
            else None
        )
        self._plain: _HFTokenizer | None = None  # a copy that reads special-token strings as text

    # ------------------------------------------------------------------ ids

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        pid = self.token_id(self.pad_token)
        return pid if pid is not None else (self.eos_id or 0)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_offsets(
        self, text: str, protected: list[tuple[int, int]] | None = None
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets. Added-token strings (special ones, and added ones not
        marked special) inside the ``protected`` character ranges (message content) are tokenized
        as text, so text from a user or a data file never becomes a control token; elsewhere (what
        a template wrote) they are the added tokens.
        Without such strings in protected ranges the result is the tokenizer's plain encoding."""
        forged = self._forged(text, protected) if protected else False
        if not forged:
            enc = self.tk.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        if self._plain is None:  # a copy that reads every added token's string as text
            doc = json.loads(self.tk.to_str())
            doc["added_tokens"] = [t for t in doc.get("added_tokens", []) if t.get("special")]
            self._plain = _HFTokenizer.from_str(json.dumps(doc))
            self._plain.encode_special_tokens = True
        ids, offs, cut = [], [], 0
        for m in self._special_re.finditer(text):
            if _overlaps(m.start(), m.end(), protected):
                continue  # written by a user: text
            tok = self._specials[m.group()]
            start, end = m.start(), m.end()
            if tok.lstrip:
                while start > cut and text[start - 1].isspace():
                    start -= 1
            if tok.rstrip:
                while end < len(text) and text[end].isspace() and not _overlaps(end, end + 1, protected):
                    end += 1
            self._encode_plain(text, cut, start, ids, offs)
            ids.append(self.tk.token_to_id(m.group()))
            offs.append((m.start(), m.end()))
            cut = end
        self._encode_plain(text, cut, len(text), ids, offs)
        return ids, offs

    def _forged(self, text: str, protected: list[tuple[int, int]]) -> bool:
        """Whether a special-token string occurs inside a protected range."""
        if self._special_re is None:
            return False
        return any(_overlaps(m.start(), m.end(), protected) for m in self._special_re.finditer(text))

    def _encode_plain(self, text: str, a: int, b: int, ids: list, offs: list) -> None:
        if a < b:
            enc = self._plain.encode(text[a:b], add_special_tokens=False)
            ids += enc.ids
            offs += [(x + a, y + a) for x, y in enc.offsets]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [i for i in ids if i >= 0]  # negative ids are image placeholders
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def add_special_token(self, content: str) -> int:
        """Add a special token (its id: the next free one) and return its id (an existing token's
        id if it is already there)."""
        from tokenizers import AddedToken

        if self.tk.token_to_id(content) is None:
            self.tk.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            self._specials[content] = self.tk.get_added_tokens_decoder()[self.tk.token_to_id(content)]
            self.special_ids.add(self.tk.token_to_id(content))
            self._special_re = re.compile(
                "|".join(re.escape(c) for c in sorted(self._specials, key=len, reverse=True))
            )
            self._plain = None
        return self.tk.token_to_id(content)

    # ------------------------------------------------------------------ files

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """A checkpoint's tokenizer: ``tokenizer.json`` (the ``tokenizers`` library), or else a
        SentencePiece ``tokenizer.model`` (``data/spm.py``), with ``tokenizer_config.json`` and
        ``special_tokens_map.json`` for the special tokens and the chat template."""
        path = Path(path)
        cfg = read_tokenizer_config(path)
        f = path / "tokenizer.json"
        if not f.is_file():
            if (path / "tokenizer.model").is_file():
                from modalign.data.spm import SentencePieceTokenizer

                return SentencePieceTokenizer.from_dir(path, cfg)
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
        tok = cls(
            _HFTokenizer.from_file(str(f)),
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            image_token=_token_str(cfg.get("image_token")),
            chat_template=cfg.get("chat_template"),
            template_name=cfg.get("modalign_template"),
        )
        tok.source_config = cfg
        return tok

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(path / "tokenizer.json"))
        # the source's other keys (padding_side, model_max_length, tokenizer_class, ...) kept
        cfg = dict(self.source_config) | {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "image_token": self.image_token,
            "chat_template": self.chat_template,
            "modalign_template": self.template_name,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def train_bpe(
        cls, texts: Iterable[str], vocab_size: int = 1024, special_tokens: list[str] | None = None
    ) -> Tokenizer:
        """Train a byte-level BPE (GPT-2 style) on ``texts``; specials get the first ids."""
        specials = list(special_tokens or DEFAULT_SPECIALS)
        tk = _HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", image_token="<image>")
