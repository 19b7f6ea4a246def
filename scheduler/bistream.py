"""Bistream (text arriving piecewise) input state machine, torch-free. Spec §5.5.

Theory of operation. Upstream `Qwen2LM.inference_bistream` pulls text one token at a time
from a generator and, after each pulled token, runs these rules (`m` = mix_ratio = (5, 15)):

  a. while prompt speech S remains: if the text cache holds >= m0 tokens, append
     [text(cache[:m0]), speech(S[:m1])] to `lm_input`, else wait for more text;
  b. once S is empty: if the last output was FILL, or nothing was generated and `lm_input`
     is just [sos], m0 new text tokens are needed (they replace `lm_input` after a fill,
     are appended to [sos] otherwise); without them, wait;
  c. decode until a FILL: forward `lm_input`; at output index `next_fill` the output is forced
     to FILL, otherwise sampled with eos masked. A FILL (forced or sampled) sets
     `next_fill = index + m1 + 1`, is appended to the outputs but never fed back, and
     `lm_input` keeps its (already consumed) value. A speech id is emitted and fed next.
  When the text ends: forward `lm_input + [text(cache), task]` and decode with eos allowed
  until eos. Quirk kept for parity: after a fill-break `lm_input` is the last consumed input,
  so it is fed a second time; prompt speech still unconsumed at that point is dropped.

Text pulled one token at a time from our pending buffer reproduces upstream exactly: upstream
does not pull text while it decodes, and pushes arriving meanwhile just wait in `_pending`.
`pending_feed()` is what the next forward must consume (None: wait for text); the scheduler
turns it into a prefill/extend or a decode item and reports the token via `on_sampled()`.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from scheduler.plan import SOS, TASK, Segment, speech_segment, text_segment

# Bistream has no min/max length upstream; a runaway decode after the text ended is capped at
# RUNAWAY_TOKENS_PER_TEXT_TOKEN x text tokens + RUNAWAY_EXTRA_TOKENS (unistream's max ratio is 20).
RUNAWAY_TOKENS_PER_TEXT_TOKEN = 20
RUNAWAY_EXTRA_TOKENS = 50


def runaway_cap(num_text_tokens: int) -> int:
    return RUNAWAY_TOKENS_PER_TEXT_TOKEN * num_text_tokens + RUNAWAY_EXTRA_TOKENS


class FeederState(enum.Enum):
    WAIT_TEXT = "wait_text"  # needs more text (rules a/b) before the next forward
    DECODE = "decode"  # rule c: forward lm_input, eos masked, fills forced
    FINAL = "final"  # text ended: decode until eos
    DONE = "done"


class Outcome(enum.Enum):
    SPEECH = "speech"  # a speech token: emit it
    FILL = "fill"  # a fill: not emitted, not fed back; wait for text
    END = "end"  # eos in the final stage
    ERROR = "error"  # upstream raises ValueError on an unexpected special id


@dataclass(frozen=True)
class Feed:
    segments: tuple[Segment, ...]
    ignore_eos: bool
    forced_token: int | None
    redraw_ids: tuple[int, ...] = ()  # special ids this stage has no rule for (upstream raises; we draw again)


class BistreamFeeder:
    def __init__(
        self,
        prompt_text_ids: tuple[int, ...] | list[int],
        prompt_speech_ids: tuple[int, ...] | list[int],
        *,
        eos_token: int = 6561,
        fill_token: int = 6563,
        mix_ratio: tuple[int, int] = (5, 15),
    ) -> None:
        self._eos = eos_token
        self._fill = fill_token
        self._specials = tuple(range(eos_token, fill_token + 1))  # eos, task/sos, fill: the ids past speech
        self._n_text, self._n_speech = mix_ratio
        self._pending: deque[int] = deque()
        self._text_cache: list[int] = list(prompt_text_ids)  # upstream seeds the cache with the prompt text
        self._speech_left: list[int] = list(prompt_speech_ids)
        self._lm_input: list[Segment] = [SOS]
        self._out_len = 0  # outputs so far, fills included
        self._last_out: int | None = None
        p = len(prompt_speech_ids)
        # tokens still needed to complete the last (partial) 15-token prompt group
        self._next_fill = (p // self._n_speech + 1) * self._n_speech - p
        self._text_done = False
        self.state = FeederState.WAIT_TEXT
        self.dropped_prompt_speech = 0

    # ------------------------------------------------------------------ text input
    def push_text(self, ids: list[int] | tuple[int, ...]) -> None:
        if self._text_done:
            raise ValueError("push_text after finish_text")
        self._pending.extend(ids)

    def finish_text(self) -> None:
        self._text_done = True

    @property
    def text_finished(self) -> bool:
        return self._text_done

    @property
    def out_len(self) -> int:
        return self._out_len

    # ------------------------------------------------------------------ planning
    def pending_feed(self) -> Feed | None:
        """What the next forward consumes, or None while waiting for text. Idempotent."""
        self._advance()
        if self.state is FeederState.DECODE:  # a fill asks for text; eos is masked
            forced = self._fill if self._out_len == self._next_fill else None
            redraw = tuple(t for t in self._specials if t != self._fill)
            return Feed(tuple(self._lm_input), ignore_eos=True, forced_token=forced, redraw_ids=redraw)
        if self.state is FeederState.FINAL:  # the text has ended: only eos ends the speech
            redraw = tuple(t for t in self._specials if t != self._eos)
            return Feed(tuple(self._lm_input), ignore_eos=False, forced_token=None, redraw_ids=redraw)
        return None

    def on_sampled(self, token: int) -> Outcome:
        if self.state is FeederState.DECODE:
            return self._on_decode_token(token)
        if self.state is FeederState.FINAL:
            return self._on_final_token(token)
        raise RuntimeError(f"on_sampled in state {self.state.value}")

    # ------------------------------------------------------------------ internals
    def _advance(self) -> None:
        while self.state is FeederState.WAIT_TEXT:
            if self._pending:
                self._text_cache.append(self._pending.popleft())
                self._on_text_token()
            elif self._text_done:
                self._enter_final()
            else:
                return

    def _on_text_token(self) -> None:
        while self._speech_left and len(self._text_cache) >= self._n_text:
            # interleaving only happens before the first forward: lm_input is still unconsumed
            self._lm_input = self._lm_input + [
                text_segment(self._take_text()),
                speech_segment(self._speech_left[: self._n_speech]),
            ]
            del self._speech_left[: self._n_speech]
        if self._speech_left:
            return
        after_fill = self._last_out == self._fill
        at_start = self._out_len == 0 and self._lm_input == [SOS]
        if after_fill or at_start:
            if len(self._text_cache) < self._n_text:
                return
            text = text_segment(self._take_text())
            self._lm_input = [text] if after_fill else self._lm_input + [text]
        self.state = FeederState.DECODE

    def _take_text(self) -> list[int]:
        taken = self._text_cache[: self._n_text]
        del self._text_cache[: self._n_text]
        return taken

    def _enter_final(self) -> None:
        self.dropped_prompt_speech = len(self._speech_left)  # upstream drops it too
        self._speech_left = []
        tail = [text_segment(self._text_cache)] if self._text_cache else []
        # quirk: a consumed lm_input (after a fill-break) is fed again
        self._lm_input = self._lm_input + tail + [TASK]
        self._text_cache = []
        self.state = FeederState.FINAL

    def _on_decode_token(self, token: int) -> Outcome:
        if token == self._fill:
            self._next_fill = self._out_len + self._n_speech + 1
            self._append_out(token)  # lm_input keeps its consumed value (quirk above)
            self.state = FeederState.WAIT_TEXT
            return Outcome.FILL
        if token >= self._eos:
            self.state = FeederState.DONE
            return Outcome.ERROR
        self._append_out(token)
        self._lm_input = [speech_segment((token,))]
        return Outcome.SPEECH

    def _on_final_token(self, token: int) -> Outcome:
        if token == self._eos:
            self.state = FeederState.DONE
            return Outcome.END
        if token > self._eos:
            self.state = FeederState.DONE
            return Outcome.ERROR
        self._append_out(token)
        self._lm_input = [speech_segment((token,))]
        return Outcome.SPEECH

    def _append_out(self, token: int) -> None:
        self._out_len += 1
        self._last_out = token
