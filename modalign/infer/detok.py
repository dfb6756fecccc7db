"""Incremental detokenisation for streamed replies: the text each new token adds, and stop
strings found (and held back while incomplete) as the text grows."""

from __future__ import annotations

from modalign.data.tokenizer import Tokenizer


class TextDelta:
    """Incremental detokenisation: the new text each token adds (multi-byte safe), in time that
    does not grow with the reply. Each push decodes a window, not the whole reply: the ids from a
    little before the last piece returned (up to ``BACK`` tokens), far enough back that the
    window's known part holds a character other than white space (tokenizers drop leading
    spaces: SentencePiece up to two; past such a character both decodes of the window drop the
    same ones), else from where the last window began (which held one already)."""

    BACK = 4

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids = tok, []
        self.start = self.done = 0  # the window begins at ids[start]; ids[:done] were returned
        self.before = ""  # the decode of ids[start:done]

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids[self.start :], skip_special_tokens=True)
        # an incomplete UTF-8 sequence (wait for more bytes), or nothing new
        if text.endswith("\ufffd") or len(text) <= len(self.before):
            return ""
        new, self.done = text[len(self.before) :], len(self.ids)
        for s in range(self.done - 1, max(self.start, self.done - self.BACK) - 1, -1):
            before = self.tok.decode(self.ids[s : self.done], skip_special_tokens=True)
            if before.strip():
                self.start, self.before = s, before
                break
        else:  # white space only close by: the window keeps its start, whose text is ``text``
            self.before = text
        return new


def find_stop(text: str, new: int, stops) -> int | None:
    """Where the earliest of ``stops`` that occurs in ``text`` begins, looking only where the last
    ``new`` characters could have completed one (earlier text was looked at already); None if
    none does."""
    stops = [s for s in stops if s]
    if not stops:
        return None
    lo = max(0, len(text) - new - max(map(len, stops)) + 1)
    found = [at for s in stops if (at := text.find(s, lo)) >= 0]
    return min(found) if found else None


class StopText:
    """A reply's text as it is generated, with stop strings honoured: ``push(token)`` returns the
    text that can be shown, holding back an ending that could still become a stop string (a stop
    split over several tokens is never shown in part); ``stopped`` once one is complete (the text
    ends before it); ``flush()`` gives what was held back when the reply ends without one."""

    def __init__(self, tok: Tokenizer, stops):
        self.delta, self.stops = TextDelta(tok), [s for s in stops if s]
        self.text, self.shown, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        piece = self.delta.push(token)
        self.text += piece
        cut = find_stop(self.text, len(piece), self.stops)
        if cut is not None:
            self.stopped, self.text = True, self.text[:cut]
            return self._show(cut)
        held = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:k])), default=0)  # fmt: skip
        return self._show(len(self.text) - held)

    def flush(self) -> str:
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        new = self.text[self.shown : upto]
        self.shown = max(self.shown, upto)
        return new
