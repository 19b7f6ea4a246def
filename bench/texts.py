"""The fixed text set of the load generator: Chinese and English, short / medium / long.

Shipped in code so every run, on every machine, sends the same texts in the same order
(request i of a level uses TEXTS[mix][i % len]). "short" is one clause (~1-2 s of speech),
"medium" one or two sentences (~4-8 s), "long" a paragraph (~15-25 s).
"""

from __future__ import annotations

import itertools
import re

SHORT: tuple[str, ...] = (
    "你好，欢迎使用语音合成服务。",
    "Hello, thanks for calling.",
    "今天天气很好。",
    "Please hold the line.",
)

MEDIUM: tuple[str, ...] = (
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。",
    "The quick brown fox jumps over the lazy dog, and then it runs back into the forest before dark.",
    "请在听到提示音后留言，我们会在二十四小时内给您回电。",
    "Your order has shipped and should arrive on Thursday; you can track it from the link we sent.",
)

LONG: tuple[str, ...] = (
    (
        "八百标兵奔北坡，炮兵并排北边跑。这是一段常见的绕口令，用来练习发音的清晰度。"
        "语音合成系统需要在很短的时间内给出第一段声音，然后以不低于实时的速度持续输出，"
        "这样听众才不会听到任何停顿或者卡顿。"
    ),
    (
        "Streaming speech synthesis has two jobs: start talking quickly, and never fall behind the listener. "
        "The first chunk should arrive in a fraction of a second, and every later chunk must arrive before "
        "the audio already played runs out, or the listener hears a gap in the middle of a word."
    ),
    (
        "在人工智能快速发展的今天，越来越多的应用开始使用语音与用户交流。从智能音箱到车载助手，"
        "从客服机器人到有声读物，自然流畅的合成语音正在改变我们获取信息的方式。"
    ),
    (
        "When the service is busy, each request still deserves a prompt first word and a smooth delivery. "
        "Batching many streams together is how a single accelerator can serve dozens of listeners at once "
        "without making any of them wait."
    ),
)

TEXTS: dict[str, tuple[str, ...]] = {
    "short": SHORT,
    "medium": MEDIUM,
    "long": LONG,
    "mixed": tuple(t for trio in zip(SHORT, MEDIUM, LONG) for t in trio),
}

# Transcript of the synthetic reference voice (bench/load.py makes the audio itself).
PROMPT_TEXT = "希望你以后能够做得比我还好哟。"

_BREAK = re.compile(r"(?<=[，。！？；,.!?;])\s*|\s+")


def text_for(mix: str, index: int) -> str:
    texts = TEXTS[mix]
    return texts[index % len(texts)]


def split_pieces(text: str, pieces: int) -> list[str]:
    """Split `text` into at most `pieces` non-empty parts of similar length, cutting only after
    punctuation or at spaces, for WebSocket continue-task frames. Joined, the parts give back
    `text` exactly, so the server hears the same sentence as over SSE."""
    if pieces < 1:
        raise ValueError("pieces must be >= 1")
    cuts = [m.end() for m in _BREAK.finditer(text) if 0 < m.end() < len(text)]
    if pieces == 1 or not cuts:
        return [text]
    chosen: list[int] = []
    for k in range(1, pieces):
        target = len(text) * k / pieces
        best = min(cuts, key=lambda c: abs(c - target))
        if best not in chosen and (not chosen or best > chosen[-1]):
            chosen.append(best)
    bounds = [0, *chosen, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if text[a:b]]
