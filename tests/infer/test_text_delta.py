"""Incremental detokenisation and stop strings: the windowed ``TextDelta`` gives the pieces that
decoding the whole reply at every token gives, ``find_stop`` finds what a search of the whole
text finds (the earliest stop), and ``StopText`` never shows text a stop string later cuts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from modalign.data.tokenizer import Tokenizer, read_tokenizer_config
from modalign.infer.detok import StopText, TextDelta, find_stop

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
LLAMA = GOLDEN / "llava_original" / "llava_llama" / "llava-v1.5-tiny-llama"
TEXTS = [
    "Hello world, how are you?",
    "  two  spaces\nand a new line",
    "héllo wörld 你好 🙂 ok",
    "1234 + 5.6 = x",
]


class WholeDecode:
    """The reference: the whole reply decoded at every token, the new part returned."""

    def __init__(self, tok):
        self.tok, self.ids, self.text = tok, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.text = text[len(self.text) :], text
        return new


def tokenizers():
    bpe = Tokenizer.train_bpe([t * 20 for t in TEXTS], vocab_size=400)
    out = [("byte-level BPE", bpe)]
    if (LLAMA / "tokenizer.model").is_file():
        from modalign.data.spm import SentencePieceTokenizer

        for legacy in (False, True):
            spm = SentencePieceTokenizer(
                LLAMA / "tokenizer.model", read_tokenizer_config(LLAMA) | {"legacy": legacy}
            )
            out.append((f"SentencePiece legacy={legacy}", spm))
    # tokenizer.json files: T5's Unigram (Metaspace), OPT's byte-level BPE
    for name in ("blip2_flan_t5", "blip2_opt"):
        if (GOLDEN / name / "checkpoint" / "tokenizer.json").is_file():
            out.append((name, Tokenizer.from_dir(GOLDEN / name / "checkpoint")))
    return out


@pytest.mark.parametrize("name,tok", tokenizers(), ids=lambda x: x if isinstance(x, str) else "")
def test_windowed_pieces_equal_whole_decodes(name, tok):
    rng = random.Random(0)
    vocab = tok.vocab_size if hasattr(tok, "vocab_size") else 400
    seqs = [tok.encode(t) for t in TEXTS] + [tok.encode("a" + " \n" * 300 + "b  c")]
    seqs += [[rng.randrange(vocab) for _ in range(rng.randrange(1, 60))] for _ in range(500)]
    for ids in seqs:
        a, b = TextDelta(tok), WholeDecode(tok)
        got = [a.push(i) for i in ids]
        assert got == [b.push(i) for i in ids], (name, ids)
        assert "".join(got) == b.text


def test_find_stop_equals_a_search_of_the_whole_text():
    rng = random.Random(1)
    stops_sets = [["ab"], ["b", "abc"], ["\n\n", "User:"], ["xyz"], [""], []]
    for _ in range(300):
        stops = rng.choice(stops_sets)
        text, found = "", None
        for _ in range(40):
            piece = "".join(rng.choice("abc\nUser:xyz ") for _ in range(rng.randrange(0, 4)))
            text += piece
            want = min((text.index(s) for s in stops if s and s in text), default=None)
            assert find_stop(text, len(piece), stops) == want, (text, piece, stops)
            if want is not None:
                found = want
                break
        assert found is None or find_stop(text, len(text), stops) == found


@pytest.mark.parametrize("name,tok", tokenizers()[:1], ids=lambda x: x if isinstance(x, str) else "")
def test_stop_text_shows_exactly_the_text_before_the_earliest_stop(name, tok):
    """Whatever the token boundaries: the pieces shown, then the flush, are the whole reply cut at
    its earliest stop string, and at every token what was shown so far is a prefix of that (a stop
    split over several tokens, "#" "#" "#" for "###", was shown in part before)."""
    rng = random.Random(2)
    chars = sorted({c for i in range(tok.vocab_size) for c in tok.decode([i])} - {"\ufffd"})
    for _ in range(300):
        stops = rng.choice([["###"], ["ab", "b c"], ["\n\n", "User:"], ["xyz"], []])
        text = "".join(
            rng.choice("ab c#\nUser:xyz" + "".join(chars[:20])) for _ in range(rng.randrange(1, 40))
        )
        ids = tok.encode(text)
        whole = tok.decode(ids, skip_special_tokens=True)
        cut = min((whole.index(s) for s in stops if s in whole), default=None)
        want = whole if cut is None else whole[:cut]
        st, shown = StopText(tok, stops), ""
        for i in ids:
            shown += st.push(i)
            assert want.startswith(shown), (stops, whole, shown)
            if st.stopped:
                break
        shown += st.flush()
        assert shown == want and st.stopped == (cut is not None), (stops, whole, shown)
