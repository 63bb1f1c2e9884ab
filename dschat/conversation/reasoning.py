"""A reasoning model's thinking, apart from its answer (DeepSeek-R1 and R1-style templates).

R1 writes its reasoning between <think> and </think>, then the answer. Its chat template opens the block itself
(the generation prompt ends with "<think>\n"), and drops the reasoning of earlier turns from the next prompt.
The conversation keeps each reply exactly as generated (the template decides what the next turn sees); the
front ends show the two parts apart, the history keeps the reasoning in its own field, and --stats counts the
tokens of each.
"""

from __future__ import annotations

THINK, UNTHINK = "<think>", "</think>"


def thinks(tok) -> bool:
    """An R1-style model: its template or its vocabulary knows <think>."""
    return THINK in (tok.chat_template or "") or UNTHINK in tok.added_tokens


class Reasoning:
    """R1-style replies: the text inside <think> ... </think> (opened by the prompt, as R1's template ends, or by
    the reply's first characters) is the reasoning, the rest the answer. feed() takes the reply's pieces in order
    and returns (reasoning, answer) text that no later piece can change; flush() the rest."""

    def __init__(self, opened: bool):
        self.state = "think" if opened else "start"
        self.buf = ""
        self.started = False  # some reasoning given out (its leading white space is dropped)

    def feed(self, piece: str) -> tuple[str, str]:
        self.buf += piece
        reasoning = answer = ""
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if THINK.startswith(head):  # "", "<", "<th": not known yet
                    return reasoning, answer
                if head.startswith(THINK):
                    self.buf, self.state = head[len(THINK):], "think"
                else:
                    self.state = "answer"
                continue
            if self.state == "think":
                if not self.started:
                    self.buf = self.buf.lstrip()
                i = self.buf.find(UNTHINK)
                if i >= 0:
                    reasoning += self.buf[:i]
                    self.buf, self.state = self.buf[i + len(UNTHINK):], "after"
                    continue
                keep = next((k for k in range(min(len(UNTHINK) - 1, len(self.buf)), 0, -1)
                             if UNTHINK.startswith(self.buf[-k:])), 0)
                out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                reasoning += out
                self.started = self.started or bool(out)
                return reasoning, answer
            if self.state == "after":
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return reasoning, answer
                self.state = "answer"
            answer += self.buf
            self.buf = ""
            return reasoning, answer

    def flush(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        if self.state == "think":
            return rest, ""
        return "", rest.lstrip() if self.state in ("start", "after") else rest


def opened(prompt_text: str) -> bool:
    """Whether this prompt ends inside a <think> block (R1's generation prompt opens it)."""
    return prompt_text.rstrip().endswith(THINK)


def split(reply: str, prompt_opened: bool) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply."""
    r = Reasoning(prompt_opened)
    a1, b1 = r.feed(reply)
    a2, b2 = r.flush()
    return a1 + a2, b1 + b2
