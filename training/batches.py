"""Training batches, each a pure function of (seed, step): the same seed gives the same data in the same order,
in any number of worker processes, and a resumed run continues with exactly the batches it would have had.

A row is one of three kinds, packed to the sequence length:
  code  a window of the training files' token stream (each file between BOS and end-of-sentence);
  fim   fill-in-the-middle examples exactly as `dschat fim` sends them (fim_data), the middle learnt;
  chat  questions in the chat template with their answers (chat_data), the answers learnt.
The last CHAT_STAGE of the steps mixes in more chat (the chat stage)."""

from __future__ import annotations

import random

import torch

from .chat_data import chat_example
from .fim_data import fim_example, line_table, pick_hole, pick_kind, token_counter

MIX = {"code": {"code": 0.45, "fim": 0.45, "chat": 0.10}, "chat": {"code": 0.2, "fim": 0.3, "chat": 0.5}}
CHAT_STAGE = 0.2
ATTEMPTS = 20  # holes tried before a row is left short


class Data:
    def __init__(self, tok, train_files, pairs, seq: int, context: int, max_middle: int, seed: int):
        self.tok, self.seq, self.context, self.max_middle, self.seed = tok, seq, context, max_middle, seed
        self.pad = tok.token_id("<｜▁pad▁｜>")
        self.texts = [t for _, t in train_files if len(t) > 200] or [t for _, t in train_files]
        self.tables: dict[int, list] = {}
        self.count = token_counter(tok)
        stream = []
        for enc in tok.tk.encode_batch([t for _, t in train_files], add_special_tokens=False):
            stream += [tok.bos_token_id] + enc.ids + [tok.eos_token_id]
        self.stream = torch.tensor(stream, dtype=torch.int32)
        self.chats = [chat_example(tok, q, a) for q, a in pairs]

    # -- rows -----------------------------------------------------------------------------------------------
    def stage(self, step: int, steps: int) -> str:
        return "chat" if step >= steps * (1 - CHAT_STAGE) else "code"

    def row(self, index: int, stage: str) -> tuple[list[int], list[int], str]:
        rng = random.Random(f"{self.seed}/{index}")
        mix = {k: w for k, w in MIX[stage].items() if k != "chat" or self.chats}
        kind = rng.choices(list(mix), weights=list(mix.values()))[0]
        ids, labels = getattr(self, kind)(rng)
        return ids, labels, kind

    def code(self, rng: random.Random) -> tuple[list[int], list[int]]:
        start = rng.randrange(0, max(1, len(self.stream) - self.seq - 1))
        window = self.stream[start:start + self.seq + 1].tolist()
        return window, window

    def fim_one(self, rng: random.Random):
        i = rng.randrange(len(self.texts))
        if i not in self.tables:
            self.tables[i] = line_table(self.texts[i])
        hole = pick_hole(self.tables[i], rng, pick_kind(rng))
        return hole and fim_example(self.tok, self.texts[i], hole, self.context, self.max_middle, self.count)

    def fim(self, rng: random.Random) -> tuple[list[int], list[int]]:
        return self.pack(lambda: self.fim_one(rng))

    def chat(self, rng: random.Random) -> tuple[list[int], list[int]]:
        return self.pack(lambda: rng.choice(self.chats), truncate=True)

    def pack(self, draw, truncate: bool = False) -> tuple[list[int], list[int]]:
        """Examples one after another while the next fits in seq + 1 tokens (a first one too long for a row
        is cut when `truncate`, else drawn again)."""
        ids, labels, room, failures = [], [], self.seq + 1, 0
        while failures < ATTEMPTS:
            ex = draw()
            if ex is not None and len(ex[0]) <= room - len(ids):
                ids, labels = ids + ex[0], labels + ex[1]
            elif ids:
                break
            elif ex is not None and truncate:
                return ex[0][:room], ex[1][:room]
            else:
                failures += 1
        return ids, labels

    # -- batches ---------------------------------------------------------------------------------------------
    def rows(self, step: int, steps: int, batch: int) -> list[tuple[list[int], list[int], str]]:
        stage = self.stage(step, steps)
        return [self.row(step * batch + r, stage) for r in range(batch)]

    def batch(self, step: int, steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, next-token targets), [batch, seq] each; targets -100 where nothing is learnt."""
        n = self.seq + 1
        xs, ys = [], []
        for ids, labels, _ in self.rows(step, steps, batch):
            xs.append(ids + [self.pad] * (n - len(ids)))
            ys.append(labels + [-100] * (n - len(labels)))
        x, y = torch.tensor(xs), torch.tensor(ys)
        return x[:, :-1], y[:, 1:]


class Batches(torch.utils.data.Dataset):
    """Steps start..steps-1 of a run, for a DataLoader (batch_size=None) with worker processes."""

    def __init__(self, data: Data, start: int, steps: int, batch: int):
        self.data, self.start, self.steps, self.batch_size = data, start, steps, batch

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __getitem__(self, i: int):
        return self.data.batch(self.start + i, self.steps, self.batch_size)
