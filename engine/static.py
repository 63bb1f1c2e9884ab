"""The decode step as one static graph: fixed device buffers, the same shapes at every token.

A decode (or 1+K verify) step of S tokens reads only these buffers, which live on the engine's device for its
whole life:
    ids         [1, S] int64   the tokens fed (a plain greedy step writes its own argmax back here, so the
                               next step needs nothing from the host)
    length      [1]    int64   positions already cached; the step's positions are length + 0..S-1, and it
                               adds S when it has run (the host fixes it after a rejected draft)
    page_table  [max_pages] int64  the sequence's pages (`LatentCache` pages); entries past its end are
                               never read: attention masks by position inside the operator
and computes, on the device, the new rows' cache slots, rotary angles, the attention over the keys
0..position (kernels/mla_decode.py `mla_decode_paged`), the logits and their argmax. Nothing in it reads a
tensor on the host or builds one from host data (the CPU's operators read small tensors inside themselves,
which is free there and opaque to a compiler: kernels/ops.py). The host writes a page number into the table
once per page (`fill_` of one entry: a scalar, no copy).

So the same step can run three ways (`StaticDecoder.mode`):
  * "eager": called as it is;
  * "compiled": `torch.compile(fullgraph=True)` of it: one graph, no recompilation while a sequence grows
    (tests/test_static_step.py keeps both true);
  * "cuda-graph": captured at load in a CUDA graph per shape in use (plain, each 1+K verify) and replayed per
    token. NOT yet measured on a GPU: on the CPU the same buffers and the same replay interface are exercised
    by the "eager" and "compiled" modes.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from ..kernels.mla_decode import paged_slots
from .cpu_step import CpuPlan
from .cpu_step_bf16 import Bf16Plan
from .step import Step

COMPILE = ("auto", "on", "off")


class CompileWarning(UserWarning):
    """The decode step was asked to compile but cannot (no C++ compiler): it runs eagerly."""


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use ($CXX, else c++ / g++ / clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled code (its FX graph cache): under dschat's cache directory, so that a
    second start finds the first one's (XDG_CACHE_HOME/dschat/inductor)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dschat" / "inductor"


def choose_mode(compile: str, device: torch.device, world_size: int = 1) -> str:
    """The StaticDecoder mode for `compile` ("auto", "on" or "off") on this device:
    CUDA: "cuda-graph" (one graph per step shape, captured at load) unless "off", or with several ranks;
    CPU: "compiled" (inductor) for "on" where a C++ compiler exists, else "eager" (with a CompileWarning when
    "on" was asked for). "auto" is "eager" on the CPU: measured on the demo model (docs/engine.md), inductor's
    first compile costs minutes on 2 cores against a gain that does not repay it in a chat's start."""
    if compile not in COMPILE:
        raise ValueError(f"compile must be one of {', '.join(COMPILE)}")
    if compile == "off":
        return "eager"
    if device.type == "cuda":
        return "cuda-graph" if world_size == 1 else "eager"
    if compile == "auto":
        return "eager"
    if cxx_compiler() is None:
        warnings.warn("no C++ compiler found (set CXX or install g++): the decode step runs without compiling",
                      CompileWarning, stacklevel=3)
        return "eager"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    return "compiled"


def decode_step(model, ids: torch.Tensor, length: torch.Tensor, page_table: torch.Tensor,
                layers: list[torch.Tensor], page_size: int):
    """One step over the static buffers: (h [S, hidden] before the final norm, logits [S, V] float32,
    argmax [S] int64). Writes the S new latent rows, adds S to `length` and, at S = 1, feeds the argmax
    back into `ids` (a greedy decode's next input)."""
    S = ids.shape[1]
    positions = length + torch.arange(S, device=ids.device)
    table = paged_slots(page_table, page_size)  # every slot of the table, once a step
    step = Step(positions, None, layers, True, table_slots=table, write_slots=table[positions])
    h = model(ids, positions, step)[0]
    logits = model.head(h)
    tokens = logits.argmax(dim=-1)
    length.add_(S)
    if S == 1:
        ids.copy_(tokens.view(1, 1))
    return h, logits, tokens


def mtp_step(model, h_prev: torch.Tensor, ids: torch.Tensor, start: torch.Tensor, page_table: torch.Tensor,
             layers: list[torch.Tensor], page_size: int):
    """V3's MTP module (depth 0) over positions start..start+S-1 of the static buffers: h_prev [S, hidden] the
    main model's normed states there, ids [1, S] the tokens that follow each. Writes its S latent rows;
    returns (h [S, hidden], logits [S, V] float32, argmax [S])."""
    S = ids.shape[1]
    positions = start + torch.arange(S, device=ids.device)
    table = paged_slots(page_table, page_size)  # every slot of the table, once a step
    step = Step(positions, None, layers, True, table_slots=table, write_slots=table[positions])
    h, logits = model.mtp_forward(0, h_prev[None], ids, positions, step)
    return h[0], logits[0], logits[0].argmax(dim=-1)


class StaticDecoder:
    """The static buffers of one engine and the step over them, run eagerly, compiled or from CUDA graphs.
    `bind(seq)` points the buffers at a sequence (once a turn); `run(seq, tokens)` feeds host tokens (drafts
    to verify), `run_fed(seq)` the token already in the ids buffer (plain decode), both returning
    (h, logits, argmax) of the step's S positions."""

    MODES = ("eager", "compiled", "cuda-graph")

    def __init__(self, model, cache, device: torch.device, context_length: int, mode: str = "eager",
                 backend: str = "inductor", shapes: tuple[int, ...] = (1,)):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}")
        self.model, self.cache, self.device, self.mode = model, cache, device, mode
        self.page_size = cache.page_size
        self.max_pages = -(-context_length // cache.page_size) + 1
        self.page_table = torch.zeros(self.max_pages, dtype=torch.long, device=device)
        self.length = torch.zeros(1, dtype=torch.long, device=device)
        self.ids: dict[int, torch.Tensor] = {}
        # the MTP drafter's step (when the model has its module): fed states, tokens and first position
        self.mtp = len(getattr(model, "mtp", ())) > 0
        self.mtp_h: dict[int, torch.Tensor] = {}
        self.mtp_ids: dict[int, torch.Tensor] = {}
        self.mtp_start = torch.zeros(1, dtype=torch.long, device=device)
        self.shapes = tuple(shapes)
        self.table: list[int] = []  # what page_table holds, as the host last wrote it
        self.graphs: dict[int, "_Graph"] = {}
        self._fn, self._mtp_fn = decode_step, mtp_step
        # the CPU's one-token step run lean (engine/cpu_step.py; a bfloat16 model's: cpu_step_bf16.py), eager mode
        # only; DSCHAT_CPU_STEP=0 turns it off
        self.lean = None
        if mode == "eager" and device.type == "cpu" and os.environ.get("DSCHAT_CPU_STEP", "1") != "0":
            with torch.no_grad():
                self.lean = CpuPlan.build(model) or Bf16Plan.build(model)
            if self.lean is not None:
                self._fn = self._lean_fn
        self._seq = None  # the sequence of the step being run (the lean step reads its pages on the host)
        self.contiguous = 0  # leading pages of the table that follow one another in the pool
        self._table_slots: torch.Tensor | None = None
        self.mtp_graphs: dict[int, "_Graph"] = {}
        t0 = time.perf_counter()
        if mode == "compiled":
            # inductor by default keeps a bf16 graph's intermediates in float32 where eager rounds each op to
            # bf16: the compiled step then decodes other greedy tokens than the eager one. Emulating eager's
            # casts keeps them the same (tests/test_static_step.py).
            opts = {"options": {"emulate_precision_casts": True}} if backend == "inductor" else {}
            self._fn = torch.compile(decode_step, backend=backend, fullgraph=True, dynamic=False, **opts)
            self._mtp_fn = torch.compile(mtp_step, backend=backend, fullgraph=True, dynamic=False, **opts)
            for s in shapes:  # compile now, at load, not after a reply's first token
                self.warm_up(s)
        self.graph_bytes = 0  # what the captured graphs hold (their memory pool), CUDA only
        if mode == "cuda-graph":
            before = torch.cuda.memory_reserved(device)
            for s in shapes:
                self.graphs[s] = _Graph(decode_step, self._args(s), self.length)
                if self.mtp:
                    self.mtp_graphs[s] = _Graph(mtp_step, self._mtp_args(s), self.mtp_start)
            self.length.zero_()
            self.graph_bytes = torch.cuda.memory_reserved(device) - before
        self.prepare_s = time.perf_counter() - t0  # compiling or capturing, at load

    @torch.inference_mode()
    def warm_up(self, S: int):
        """Run one step of S tokens on a scratch sequence (its page freed after): compiles that shape."""
        seq = self.cache.open([], limit=0)
        try:
            self.bind(seq)
            self.run(seq, [0] * S)
            if self.mtp:
                self.run_mtp(seq, 0, torch.zeros(S, self.model.cfg.hidden_size, device=self.device,
                                                  dtype=self.model.model.norm.weight.dtype), [0] * S)
        finally:
            self.cache.close(seq, insert=False)

    def _args(self, S: int):
        return (self.model, self.ids_buffer(S), self.length, self.page_table, self.cache.layers, self.page_size)

    def _mtp_args(self, S: int):
        if S not in self.mtp_ids:
            self.mtp_ids[S] = torch.zeros(1, S, dtype=torch.long, device=self.device)
            # the hidden states' dtype: the model's (lm_head's weight is packed integers under --quant on the CPU)
            self.mtp_h[S] = torch.zeros(S, self.model.cfg.hidden_size, device=self.device,
                                        dtype=self.model.model.norm.weight.dtype)
        return (self.model, self.mtp_h[S], self.mtp_ids[S], self.mtp_start, self.page_table, self.cache.layers,
                self.page_size)

    def run_mtp(self, seq, start: int, h: torch.Tensor, next_ids: list[int] | torch.Tensor):
        """The MTP module over positions start.. of seq (see engine.Engine._mtp), through static buffers:
        (h, logits) of its S positions. Only for the step shapes in use (`shapes`)."""
        S = len(next_ids)
        args = self._mtp_args(S)
        self.cache.reserve(seq, start + S)
        self.sync(seq)
        args[1].copy_(h)
        if isinstance(next_ids, torch.Tensor):  # the module's own draft, still on the device
            args[2].copy_(next_ids.view(1, -1))
        else:
            _write_ids(args[2][0], next_ids)
        self.mtp_start.fill_(start)
        out = self.mtp_graphs[S].replay() if S in self.mtp_graphs else self._mtp_fn(*args)
        return out[0], out[1]

    def ids_buffer(self, S: int) -> torch.Tensor:
        if S not in self.ids:
            self.ids[S] = torch.zeros(1, S, dtype=torch.long, device=self.device)
        return self.ids[S]

    # -- the sequence ----------------------------------------------------------------------------------
    def bind(self, seq):
        """Point the buffers at seq: its page table and length."""
        self.table = []
        self.contiguous = 0
        self.sync(seq)
        self.length.fill_(len(seq.ids))

    def sync(self, seq):
        """Write the page numbers seq has gained (or changed) since the last call: one entry a page."""
        pages = seq.pages
        if pages == self.table:
            return
        j = 0
        while j < len(self.table) and j < len(pages) and self.table[j] == pages[j]:
            j += 1
        for k in range(j, len(pages)):
            self.page_table[k] = pages[k]  # a fill with a scalar: no host tensor, no copy
        self.table = list(pages)
        c = min(self.contiguous, j)
        while c < len(pages) and (c == 0 or pages[c] == pages[c - 1] + 1):
            c += 1
        self.contiguous = c
        self._table_slots = None

    def set_length(self, n: int):
        self.length.fill_(n)

    # -- steps --------------------------------------------------------------------------------------------
    def run(self, seq, tokens: list[int], drafts: torch.Tensor | None = None):
        """Feed host tokens (a token and the drafts to verify) after seq's cached ones, then `drafts`, ids still
        on the device (MTP's, [n]) that seq holds as placeholders (-1) until the caller has read them."""
        n = 0 if drafts is None else drafts.numel()
        buf = self.ids_buffer(len(tokens) + n)
        _write_ids(buf[0, :len(tokens)], tokens)
        if n:
            buf[0, len(tokens):].copy_(drafts)
            tokens = list(tokens) + [-1] * n
        out = self._step(seq, len(tokens))
        seq.ids.extend(tokens)
        return out

    def run_fed(self, seq, token: int = -1):
        """Feed the token the ids buffer [1, 1] already holds (the last step's argmax, or `feed`'s): `token`
        is its id where the host knows it, else a placeholder the caller replaces once it has read it."""
        out = self._step(seq, 1)
        seq.ids.append(token)
        return out

    def feed(self, token: torch.Tensor):
        """Put a device token (a sampled one) into the plain step's ids buffer."""
        self.ids_buffer(1).copy_(token.view(1, 1))

    def _step(self, seq, S: int):
        self.cache.reserve(seq, len(seq.ids) + S)
        self.sync(seq)
        if S in self.graphs:
            return self.graphs[S].replay()
        self._seq = seq
        try:
            return self._fn(*self._args(S))
        finally:
            self._seq = None

    def _lean_fn(self, model, ids, length, page_table, layers, page_size):
        """decode_step's contract; at one token on the CPU the lean step (engine/cpu_step.py), for which the
        host gives the row to write and the keys to read from the sequence's pages."""
        seq = self._seq
        if ids.shape[1] != 1 or seq is None:
            return decode_step(model, ids, length, page_table, layers, page_size)
        P = self.page_size
        pos = len(seq.ids)
        slot = self.table[pos // P] * P + pos % P
        if pos // P < self.contiguous:  # the keys 0..pos lie in one run of pages: a view of the pool
            first = self.table[0] * P
            keys = slice(first, first + pos + 1)
        else:
            if self._table_slots is None:
                self._table_slots = paged_slots(self.page_table, P)
            keys = self._table_slots[:pos + 1]
        return self.lean.step(ids, length, layers, slot, keys)


def _write_ids(buf: torch.Tensor, ids: list[int]):
    """Host ids into a device buffer [S] without a host tensor: a copy from pageable host memory waits for the
    device's queue (a sync), a fill with a scalar does not. The step's shapes are a few tokens (1 + drafts);
    more go as one copy."""
    if len(ids) > 8:
        buf.copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        return
    for j, t in enumerate(ids):
        buf[j].fill_(t)


class _Graph:
    """One shape of the step captured in a CUDA graph (static inputs: the decoder's buffers; static outputs:
    h, logits, argmax, overwritten by the next replay). Captured at load, before anything is cached: the
    warm-up runs write rows of page 0 at positions 0..S-1, which nothing holds yet."""

    def __init__(self, fn, args, position: torch.Tensor):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: Triton compiles, allocator pools fill
                position.zero_()
                fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        position.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.out = fn(*args)
        torch.cuda.synchronize()
        position.zero_()

    def replay(self):
        self.graph.replay()
        return self.out


class TokenReader:
    """Reads device tokens on the host. On CUDA each read is a non-blocking copy into pinned memory started as
    soon as the token exists (`start`), waited for only when the host needs it (`wait`), so the next step can
    be queued in between; elsewhere a plain read."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.slots = [torch.empty(1, dtype=torch.long, pin_memory=True) for _ in range(2)] if self.cuda else []
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else []
        self.i = 0

    def start(self, token: torch.Tensor):
        """Begin reading a device token [] or [1]; returns a handle for `wait`."""
        if not self.cuda:
            return token
        i = self.i = (self.i + 1) % 2
        self.slots[i].copy_(token.view(1), non_blocking=True)
        self.events[i].record()
        return i

    def wait(self, handle) -> int:
        if not self.cuda:
            return int(handle)
        self.events[handle].synchronize()
        return int(self.slots[handle][0])
