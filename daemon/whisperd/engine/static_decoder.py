"""A batched Whisper window decoder with a static KV cache, for GPUs (and the same code on CPUs).

transformers' `generate()` spends most of a step in Python: the decoder's kernels are launched one
by one and the timestamp rules loop over the batch on the host. On a GPU that bounds whisper-base
at a few hundred times real time whatever the batch. Here:

- the encoder runs once per admission of windows, and each layer's cross-attention keys and values
  are computed once per window; on CUDA an admission is a graph too, per group of 1, 2, 4 ... 32
  windows;
- self-attention keys and values go into a cache allocated once for the longest sequence (448
  tokens), so every step has the same shapes;
- one step (embedding, all layers, logits, Whisper's token rules, greedy or sampled choice, the
  running log-probability) is a fixed sequence of tensor operations with no host synchronisation,
  which CUDA captures once per batch-size bucket as a graph and replays per token;
- each row is at its own position, so a row can join the batch in flight in any free slot and
  leave it the moment it finishes (continuous batching): a batch does not run until its slowest
  row ends with the others' slots idle, and a window's next pass does not wait for a new batch.
  Free slots are masked; the batch moves to a smaller bucket when it empties, a larger one when
  rows wait.

The rules on the finished token lists (fallback, no-speech skip, segment cuts) are in
`window_rules`. The model's layers are called as modules, so IPEX-LLM's low-bit layers and plain
torch layers run through the same code; only CUDA gets graphs (`use_graphs`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from whisperd.engine.window_rules import Attempt

log = logging.getLogger(__name__)

NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class TokenRules:
    """The special tokens and suppression lists of a Whisper generation config."""

    eos: int
    no_timestamps: int
    timestamp_begin: int
    no_speech: int
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    max_initial_timestamp_index: int | None
    vocab_size: int

    @classmethod
    def from_generation_config(cls, config, vocab_size: int) -> TokenRules:  # noqa: ANN001 - transformers' GenerationConfig
        no_timestamps = int(config.no_timestamps_token_id)
        return cls(
            eos=int(config.eos_token_id),
            no_timestamps=no_timestamps,
            timestamp_begin=no_timestamps + 1,
            no_speech=no_timestamps - 1,  # <|nospeech|> / <|nocaptions|>, as transformers reads it
            suppress=tuple(int(t) for t in (config.suppress_tokens or ())),
            begin_suppress=tuple(int(t) for t in (config.begin_suppress_tokens or ())),
            max_initial_timestamp_index=getattr(config, "max_initial_timestamp_index", None),
            vocab_size=vocab_size,
        )


@dataclass(frozen=True, slots=True)
class Prefix:
    """The tokens a window's decode starts from: an optional prompt (<|startofprev|> ...), then
    start-of-transcript, language and task. The no-speech probability is read from the model's
    output at start-of-transcript."""

    tokens: tuple[int, ...]
    sot_position: int = 0


class _Buffers:
    """Everything one batch-size bucket's step reads and writes, allocated once (graphs replay on
    these addresses). Each row (slot) is at its own position: rows start and end independently."""

    def __init__(self, batch: int, layers: int, heads: int, head_dim: int, audio_ctx: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        def zeros(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=kind, device=device)

        self.batch = batch
        self.self_k = zeros(layers, batch, heads, max_len, head_dim)
        self.self_v = zeros(layers, batch, heads, max_len, head_dim)
        self.cross_k = zeros(layers, batch, heads, audio_ctx, head_dim)
        self.cross_v = zeros(layers, batch, heads, audio_ctx, head_dim)
        self.position = zeros(batch, kind=torch.long)  # the position of `token` in each row
        self.limit = zeros(batch, kind=torch.long)  # the position at which a row stops
        self.token = zeros(batch, kind=torch.long)  # the token at `position`
        self.previous = zeros(batch, kind=torch.long)  # the token before it
        self.sequence = zeros(batch, max_len, kind=torch.long)  # prefix (forced), then what was chosen
        self.prefix_len = torch.ones(batch, dtype=torch.long, device=device)
        self.sot_position = zeros(batch, kind=torch.long)
        self.temperature = zeros(batch, kind=torch.float32)
        self.seed = zeros(batch, kind=torch.long)  # a sampled row's draws depend on this and its position only
        self.ban_eos = zeros(batch, kind=torch.bool)  # speed runs: a fixed number of tokens
        self.finished = torch.ones(batch, dtype=torch.bool, device=device)  # free slots count as finished
        self.generated = zeros(batch, kind=torch.long)  # tokens chosen so far, end-of-text included
        self.sum_logprob = zeros(batch, kind=torch.float32)
        self.last_timestamp = zeros(batch, kind=torch.long)  # -1: none chosen yet
        self.no_speech_prob = zeros(batch, kind=torch.float32)

    CACHES = ("self_k", "self_v", "cross_k", "cross_v")

    def step_state(self) -> dict[str, torch.Tensor]:
        """The per-row state a step moves on, without the key/value caches: a step only reads the
        cross-attention cache, and writes the self-attention cache at a row's position before it
        reads it (later positions are masked), so running extra steps leaves nothing to undo there.
        The caches are most of the memory (large-v3 at batch 128: 31 GB), so a capture never saves them."""
        return {name: t for name, t in vars(self).items() if isinstance(t, torch.Tensor) and name not in self.CACHES}

    def first_rows(self, size: int) -> _Buffers:
        """The first `size` slots as a bucket of their own: views, so every bucket shares this
        memory, and each layer's slice of a cache is contiguous."""
        view = object.__new__(_Buffers)
        for name, t in vars(self).items():
            if isinstance(t, torch.Tensor):
                setattr(view, name, t[:, :size] if name in self.CACHES else t[:size])
        view.batch = size
        return view

    def copy_rows(self, source: torch.Tensor, target: torch.Tensor, other: _Buffers | None = None) -> None:
        """Copy the rows at `source` (of `other`, by default this storage) into the slots at
        `target`, one layer of cache at a time so a large model's move needs little memory."""
        other = other or self
        for name in self.CACHES:
            mine, theirs = getattr(self, name), getattr(other, name)
            for layer in range(mine.shape[0]):
                mine[layer].index_copy_(0, target, theirs[layer].index_select(0, source))
        for name, mine in self.step_state().items():
            mine.index_copy_(0, target, getattr(other, name).index_select(0, source))


def bytes_per_row(layers: int, d_model: int, audio_ctx: int, max_len: int, dtype: torch.dtype) -> int:
    """The key/value caches of one row: self-attention (max_len) and cross-attention (audio_ctx)."""
    return 2 * layers * d_model * (max_len + audio_ctx) * dtype.itemsize


class StaticCacheDecoder:
    """Decodes 30 s windows with a static cache; see the module docstring.

    Rows are admitted into free slots of the batch in flight (`admit`), the batch moves a few
    tokens at a time (`advance`, which hands back the rows that finished and frees their slots),
    and the batch moves to a larger or smaller bucket as the rows in flight need. `decode` runs a
    given set of windows through the same steps.
    """

    CHECK_EVERY = 8  # steps between looks at which rows finished (each look waits for the device)

    def __init__(self, model: Any, rules: TokenRules, *, max_batch: int = 128,
                 use_graphs: bool | None = None) -> None:
        # transformers' or ipex-llm's Whisper model: its config and modules are read by name.
        self.model = model
        self.rules = rules
        decoder = model.get_decoder()
        self.decoder = decoder
        self.layers = list(decoder.layers)
        config = model.config
        self.heads = int(config.decoder_attention_heads)
        self.d_model = int(config.d_model)
        self.head_dim = self.d_model // self.heads
        self.max_len = int(config.max_target_positions)
        self.audio_ctx = int(config.max_source_positions)
        self.dtype = decoder.embed_tokens.weight.dtype
        self.device = decoder.embed_tokens.weight.device
        self.max_batch = self._rows_that_fit(max_batch)
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self._storage: _Buffers | None = None  # every bucket is a view of its first rows
        self._views: dict[int, _Buffers] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # the step, per bucket
        # Admissions, per group size: the graph and its inputs (features, ints, floats).
        self._load_graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self._load_pool: Any = None  # torch.cuda.graph_pool_handle()
        self._live: _Buffers | None = None  # the bucket the rows in flight are in
        self._occupants: list[object | None] = []  # per slot of that bucket: the caller's tag, None if free
        self.steps_run = 0
        self._constants()

    # Of the GPU memory free once the model is loaded, how much the caches may take (the rest is
    # the encoder's activations for an admission, log-mel features, the speech scan).
    CACHE_SHARE_OF_FREE_MEMORY = 0.6

    def _rows_that_fit(self, wanted: int) -> int:
        """`wanted`, or on a GPU the largest power of two whose caches fit in a share of the free
        memory (large-v3 needs 0.32 GB a row: 128 rows would not fit beside it on most cards)."""
        free = _free_memory(self.device)
        if free is None:
            return wanted
        per_row = bytes_per_row(len(self.layers), self.d_model, self.audio_ctx, self.max_len, self.dtype)
        fit = max(1, int(free * self.CACHE_SHARE_OF_FREE_MEMORY) // per_row)
        if fit >= wanted:
            return wanted
        rows = 1 << (fit.bit_length() - 1)
        log.warning("decoder batch capped by GPU memory", extra={"rows": rows, "wanted": wanted,
                                                                "free_gb": round(free / 2**30, 1)})
        return rows

    def _constants(self) -> None:
        r, vocab = self.rules, self.rules.vocab_size
        ids = torch.arange(vocab, device=self.device)
        self.vocab_ids = ids
        self.is_timestamp = ids >= r.timestamp_begin
        self.is_text = ids < r.eos
        self.is_eos = ids == r.eos
        suppress = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        suppress[list(r.suppress)] = True
        suppress[r.no_timestamps] = True
        self.suppress = suppress
        begin = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        begin[list(r.begin_suppress)] = True
        # The first chosen token must be a timestamp, and not later than max_initial_timestamp.
        begin |= ~self.is_timestamp
        if r.max_initial_timestamp_index is not None:
            begin |= ids > r.timestamp_begin + r.max_initial_timestamp_index
        self.begin_suppress = begin
        self.key_positions = torch.arange(self.max_len, device=self.device)

    # -- public -----------------------------------------------------------------------------------

    def bucket(self, rows: int) -> int:
        """The batch size `rows` rows run at: a power of two, so few graphs exist."""
        size = 1
        while size < rows:
            size *= 2
        return min(size, max(self.max_batch, rows))

    @property
    def occupied(self) -> int:
        """Rows in flight."""
        return sum(tag is not None for tag in self._occupants)

    @property
    def room(self) -> int:
        """How many more rows `admit` takes now."""
        return self.max_batch - self.occupied

    @torch.inference_mode()
    def admit(self, features: torch.Tensor, prefixes: Sequence[Prefix], temperatures: Sequence[float],
              tags: Sequence[object], *, seeds: Sequence[int] | None = None, fixed_tokens: int | None = None) -> None:
        """Start decoding these windows (features: (rows, n_mels, 3000)), each after its prefix
        (start-of-transcript, language, task; a prompt before them) at its temperature (0: greedy).
        A sampled row's choices depend only on its seed (default: its index here), not on the rows
        beside it. `advance` hands each back with its tag. `fixed_tokens` makes a row choose
        exactly that many tokens, end-of-text never among them (for speed measurements)."""
        rows = len(tags)
        if rows > self.room:
            raise ValueError(f"{rows} rows do not fit beside {self.occupied} in a batch of {self.max_batch}")
        if rows == 0:
            return
        needed = self.bucket(self.occupied + rows)
        if self._live is None or needed > self._live.batch or not self.occupied:  # an empty batch starts small
            self._move_to(needed)
        slots = [slot for slot, tag in enumerate(self._occupants) if tag is None][:rows]
        assert self._live is not None
        self._load(slots, features, prefixes, temperatures, range(rows) if seeds is None else seeds, fixed_tokens)
        for slot, tag in zip(slots, tags):
            self._occupants[slot] = tag

    @torch.inference_mode()
    def advance(self, steps: int | None = None) -> list[tuple[object, Attempt]]:
        """Run `steps` tokens (CHECK_EVERY by default) for every row in flight; return the rows that
        finished, as (tag, attempt), and free their slots. A batch left mostly empty moves to a
        smaller bucket, where a step costs less."""
        buf = self._live
        if buf is None or not self.occupied:
            return []
        steps = steps or self.CHECK_EVERY
        step = self._graph_step(buf) if self.use_graphs else (lambda: self._step(buf))
        for _ in range(steps):
            step()
        self.steps_run += steps
        (finished,) = _to_host(buf.finished)
        done = [slot for slot, tag in enumerate(self._occupants) if tag is not None and finished[slot]]
        if not done:
            return []
        attempts = self._attempts(buf, done)
        out = [(self._occupants[slot], attempt) for slot, attempt in zip(done, attempts)]
        for slot in done:
            self._occupants[slot] = None
        if self.occupied and self.bucket(self.occupied) * 4 <= buf.batch:
            self._move_to(self.bucket(self.occupied))
        return out

    def drop(self) -> None:
        """Give up every row in flight (after a failure)."""
        self._occupants = [None] * len(self._occupants)
        if self._live is not None:
            self._live.finished.fill_(True)

    @torch.inference_mode()
    def decode(self, features: torch.Tensor, prefixes: Sequence[Prefix], temperatures: Sequence[float], *,
               fixed_tokens: int | None = None) -> list[Attempt]:
        """Decode these windows (see `admit`) and return their attempts in order; no other rows may
        be in flight."""
        if self.occupied:
            raise RuntimeError("decode() needs the decoder to itself; rows are in flight")
        rows = features.shape[0]
        found: list[Attempt | None] = [None] * rows
        start = 0
        while start < rows or self.occupied:
            take = min(self.room, rows - start)
            if take:
                stop = start + take
                self.admit(features[start:stop], prefixes[start:stop], temperatures[start:stop], range(start, stop),
                           seeds=range(start, stop), fixed_tokens=fixed_tokens)
                start = stop
            for row, attempt in self.advance():
                found[cast(int, row)] = attempt  # the tags given to admit() above
        return [attempt for attempt in found if attempt is not None]

    def warm_up(self, batch_sizes: Sequence[int], n_mels: int) -> None:
        """Capture the graphs (and pick the kernels) for these batch sizes now, before any job waits."""
        sizes = sorted({self.bucket(b) for b in batch_sizes})
        self._storage_for(sizes[-1])  # the largest first: a storage that grows loses its graphs
        for size in sizes:
            features = torch.zeros(size, n_mels, 3000, dtype=self.dtype, device=self.device)
            self.decode(features, [Prefix((self.rules.eos,))] * size, [0.0] * size)

    # -- slots ------------------------------------------------------------------------------------

    def _move_to(self, size: int) -> None:
        """Make the bucket of `size` rows the live one. Buckets are the first rows of one storage:
        growing moves nothing, shrinking moves the rows beyond the new size into free slots below."""
        target = self._buffers_for(size)
        storage = self._storage
        assert storage is not None
        if self._live is target:
            return
        old = self._live.batch if self._live is not None else None  # None: a new storage, rows at its start
        taken = [slot for slot, tag in enumerate(self._occupants) if tag is not None]
        movers = [slot for slot in taken if slot >= size]
        if movers:
            free = [slot for slot in range(size) if slot not in taken][:len(movers)]
            storage.copy_rows(self._index(movers), self._index(free))
            for source, slot in zip(movers, free):
                self._occupants[slot], self._occupants[source] = self._occupants[source], None
        if old is not None and size > old:
            storage.finished[old:size] = True  # slots last used by another bucket hold stale rows
        self._occupants = (self._occupants + [None] * size)[:size]
        self._live = target

    def _storage_for(self, size: int) -> _Buffers:
        """The storage, replaced by a larger one (the rows in flight copied over, graphs captured
        again) when `size` rows do not fit; on a GPU warm_up makes it max_batch rows at once."""
        old = self._storage
        if old is not None and old.batch >= size:
            return old
        new = _Buffers(size, len(self.layers), self.heads, self.head_dim, self.audio_ctx, self.max_len,
                       self.dtype, self.device)
        taken = [slot for slot, tag in enumerate(self._occupants) if tag is not None]
        if old is not None and taken:
            new.copy_rows(self._index(taken), self._index(list(range(len(taken)))), other=old)
            self._occupants = [self._occupants[slot] for slot in taken]
        else:
            self._occupants = []
        self._storage, self._live = new, None
        self._views.clear()
        self._graphs.clear()
        self._load_graphs.clear()
        self._load_pool = None  # released with the last graph that used it: a new one for the next
        return new

    def _buffers_for(self, size: int) -> _Buffers:
        storage = self._storage_for(size)
        if size not in self._views:
            self._views[size] = storage if size == storage.batch else storage.first_rows(size)
        return self._views[size]

    def _index(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)

    # The per-row fields `_load` sets, in the order of the columns after the sequence in the packed
    # integer upload (the float ones go in a second, smaller upload).
    _INT_FIELDS = ("prefix_len", "limit", "sot_position", "token", "previous", "position", "generated",
                   "last_timestamp", "ban_eos", "finished", "seed")
    _FLOAT_FIELDS = ("temperature", "sum_logprob", "no_speech_prob")

    def _load(self, slots: list[int], features: torch.Tensor, prefixes: Sequence[Prefix],
              temperatures: Sequence[float], seeds: Sequence[int], fixed_tokens: int | None) -> None:
        """Encode the windows, fill their slots' cross-attention keys and values, reset their state.
        The rows' state goes up in one copy that does not wait for the device; the rows are loaded
        in power-of-two groups (see _load_group)."""
        rows, last = len(slots), self.max_len - 1
        ints = torch.full((rows, 1 + self.max_len + len(self._INT_FIELDS)), self.rules.eos, dtype=torch.long)
        ints[:, 0] = torch.tensor(slots, dtype=torch.long)
        sequence = ints[:, 1:1 + self.max_len]
        for row, prefix in enumerate(prefixes):
            sequence[row, :len(prefix.tokens)] = torch.tensor(prefix.tokens, dtype=torch.long)
        prefix_len = torch.tensor([len(p.tokens) for p in prefixes], dtype=torch.long)
        starts = {
            "prefix_len": prefix_len,
            "limit": last if fixed_tokens is None else (prefix_len - 1 + fixed_tokens).clamp(max=last),
            "sot_position": torch.tensor([p.sot_position for p in prefixes], dtype=torch.long),
            "token": sequence[:, 0], "previous": self.rules.eos, "position": 0, "generated": 0,
            "last_timestamp": -1,  # none chosen yet
            "ban_eos": int(fixed_tokens is not None), "finished": 0,
            "seed": torch.tensor([seed & _MASK32 for seed in seeds], dtype=torch.long),
        }
        for column, name in enumerate(self._INT_FIELDS, start=1 + self.max_len):
            ints[:, column] = starts[name]
        floats = torch.zeros(rows, len(self._FLOAT_FIELDS), dtype=torch.float32)  # sum_logprob, no_speech_prob
        floats[:, self._FLOAT_FIELDS.index("temperature")] = torch.tensor(list(temperatures), dtype=torch.float32)
        ints, floats = _to_device(ints, self.device), _to_device(floats, self.device)
        features = features.to(self.dtype)
        start = 0
        for size in _power_of_two_groups(rows, self.LOAD_GROUP):
            group = slice(start, start + size)
            self._load_group(features[group], ints[group], floats[group])
            start += size

    # Rows loaded by one encoder call at most: from about 16 windows on, the encoder's time per
    # window is flat (0.43 ms for whisper-base on an H200), and each captured group size keeps its
    # activations (about 0.5 GB for whisper-base at 32).
    LOAD_GROUP = 32

    def _load_group(self, features: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor) -> None:
        """Load rows (a power of two of them), as a CUDA graph per group size where graphs are used:
        eagerly, the encoder alone is about a hundred kernel launches from Python, 4 ms of the host's
        time whatever the batch, and far more while other threads hold the interpreter lock."""
        storage = self._storage
        assert storage is not None
        if not self.use_graphs:
            self._load_rows(storage, features, ints, floats)
            return
        size = features.shape[0]
        captured = self._load_graphs.get(size)
        if captured is None:
            inputs: tuple[torch.Tensor, ...] = (features.clone(), ints.clone(), floats.clone())
            if self._load_pool is None:
                self._load_pool = torch.cuda.graph_pool_handle()
            # Loading the same rows again writes the same values, so the runs before the capture
            # load these rows for real and the capture changes nothing. One memory pool serves every
            # group size: the graphs only run one at a time, on one stream, and keep nothing between
            # runs (everything they write is in the storage).
            graph = _capture(lambda: self._load_rows(storage, *inputs), runs_before=2, pool=self._load_pool)
            self._load_graphs[size] = captured = (graph, inputs)
            log.debug("decoder admission captured", extra={"rows": size})
        graph, inputs = captured
        for static, given in zip(inputs, (features, ints, floats)):
            static.copy_(given)
        graph.replay()

    def _load_rows(self, storage: _Buffers, features: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor) -> None:
        """The encoder over these windows, their cross-attention keys and values and their start
        state (ints: slot, sequence, then _INT_FIELDS; floats: _FLOAT_FIELDS) written into their
        slots of the storage, which every bucket shares."""
        index = ints[:, 0]
        encoded = self.model.get_encoder()(features).last_hidden_state
        for i, layer in enumerate(self.layers):
            attention = layer.encoder_attn
            storage.cross_k[i].index_copy_(0, index, self._heads_first(attention.k_proj(encoded)))
            storage.cross_v[i].index_copy_(0, index, self._heads_first(attention.v_proj(encoded)))
        storage.sequence.index_copy_(0, index, ints[:, 1:1 + self.max_len])
        for column, name in enumerate(self._INT_FIELDS):
            target = getattr(storage, name)
            target.index_copy_(0, index, ints[:, 1 + self.max_len + column].to(target.dtype))
        for column, name in enumerate(self._FLOAT_FIELDS):
            getattr(storage, name).index_copy_(0, index, floats[:, column])

    def _heads_first(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def _attempts(self, buf: _Buffers, slots: list[int]) -> list[Attempt]:
        index = self._index(slots)
        ints = torch.cat([buf.prefix_len.unsqueeze(1), buf.generated.unsqueeze(1), buf.sequence], dim=1)
        floats = torch.stack([buf.sum_logprob, buf.no_speech_prob], dim=1)
        host_ints, host_floats = _to_host(ints.index_select(0, index), floats.index_select(0, index))
        out = []
        for row in range(len(slots)):
            prefix_len, generated, sequence = host_ints[row][0], host_ints[row][1], host_ints[row][2:]
            sum_logprob, no_speech = host_floats[row]
            tokens = tuple(sequence[prefix_len:prefix_len + generated])
            out.append(Attempt(tokens=tokens, avg_logprob=sum_logprob / max(1, generated), no_speech_prob=no_speech))
        return out

    # -- the step ---------------------------------------------------------------------------------

    def _graph_step(self, buf: _Buffers):  # noqa: ANN202 - a callable that runs one step
        """The step as a CUDA graph for this bucket, captured on first use."""
        size = buf.batch
        if size not in self._graphs:
            state = {name: t.clone() for name, t in buf.step_state().items()}
            graph = _capture(lambda: self._step(buf), runs_before=3)
            for name, t in state.items():  # the warm-up and the capture moved the state on
                getattr(buf, name).copy_(t)
            self._graphs[size] = graph
            log.debug("decoder step captured", extra={"batch": size})
        return self._graphs[size].replay

    def _step(self, buf: _Buffers) -> None:
        """Feed each row's `token` at its `position`, choose the token after it, advance. No host
        synchronisation."""
        logits = self._logits(buf)
        self._choose(buf, logits)

    def _logits(self, buf: _Buffers) -> torch.Tensor:
        decoder, size = self.decoder, buf.batch
        position = buf.position
        x = decoder.embed_tokens(buf.token) + decoder.embed_positions.weight.index_select(0, position)
        x = x.unsqueeze(1)  # (batch, 1, d_model)
        visible = (self.key_positions.unsqueeze(0) <= position.unsqueeze(1)).view(size, 1, 1, self.max_len)
        at = position.view(size, 1, 1, 1).expand(size, self.heads, 1, self.head_dim)
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            q = self._heads_first(attention.q_proj(h))
            buf.self_k[i].scatter_(2, at, self._heads_first(attention.k_proj(h)))
            buf.self_v[i].scatter_(2, at, self._heads_first(attention.v_proj(h)))
            a = F.scaled_dot_product_attention(q, buf.self_k[i], buf.self_v[i], attn_mask=visible)
            x = x + attention.out_proj(a.transpose(1, 2).reshape(size, 1, self.d_model))
            cross = layer.encoder_attn
            h = layer.encoder_attn_layer_norm(x)
            a = F.scaled_dot_product_attention(self._heads_first(cross.q_proj(h)), buf.cross_k[i], buf.cross_v[i])
            x = x + cross.out_proj(a.transpose(1, 2).reshape(size, 1, self.d_model))
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
        x = decoder.layer_norm(x)
        return self.model.proj_out(x)[:, 0].float()

    def _choose(self, buf: _Buffers, logits: torch.Tensor) -> None:
        """Whisper's token rules as masks over the vocabulary, then the choice, for every row."""
        r = self.rules
        position = buf.position
        following = position + 1  # the index of the token being chosen
        chosen_before = buf.generated
        active = ~buf.finished
        generating = following >= buf.prefix_len
        first = following == buf.prefix_len
        at_sot = (position == buf.sot_position) & active
        no_speech = torch.softmax(logits, dim=-1)[:, r.no_speech]
        buf.no_speech_prob.copy_(torch.where(at_sot, no_speech, buf.no_speech_prob))

        last_is_time = (chosen_before >= 1) & (buf.token >= r.timestamp_begin)
        penultimate_is_time = (chosen_before < 2) | (buf.previous >= r.timestamp_begin)
        has_time = buf.last_timestamp >= 0
        time_floor = torch.where(last_is_time & ~penultimate_is_time, buf.last_timestamp, buf.last_timestamp + 1)
        banned = self.suppress.unsqueeze(0) | (first.unsqueeze(1) & self.begin_suppress.unsqueeze(0))
        banned = banned | (buf.ban_eos.unsqueeze(1) & self.is_eos.unsqueeze(0))
        banned = banned | ((last_is_time & penultimate_is_time).unsqueeze(1) & self.is_timestamp.unsqueeze(0))
        banned = banned | ((last_is_time & ~penultimate_is_time).unsqueeze(1) & self.is_text.unsqueeze(0))
        banned = banned | (has_time.unsqueeze(1) & self.is_timestamp.unsqueeze(0)
                           & (self.vocab_ids.unsqueeze(0) < time_floor.unsqueeze(1)))
        scores = logits.masked_fill(banned, NEG_INF)
        # When the timestamps together are likelier than any text token, a timestamp comes next.
        logprobs = torch.log_softmax(scores, dim=-1)
        time_mass = torch.logsumexp(logprobs[:, r.timestamp_begin:], dim=-1)
        best_text = logprobs[:, :r.timestamp_begin].max(dim=-1).values
        scores = scores.masked_fill((time_mass > best_text).unsqueeze(1) & ~self.is_timestamp.unsqueeze(0), NEG_INF)

        logprobs = torch.log_softmax(scores, dim=-1)
        greedy = scores.argmax(dim=-1)
        hot = buf.temperature > 0
        # Sampling at the row's temperature by the inverse of its distribution function, from one
        # uniform number a row and step (what torch.multinomial draws from, as generate() samples).
        cdf = torch.softmax(scores / buf.temperature.clamp(min=1e-6).unsqueeze(1), dim=-1).cumsum(dim=-1)
        drawn = _uniform(buf.seed, position) * cdf[:, -1]
        sampled = torch.searchsorted(cdf, drawn.unsqueeze(1)).squeeze(1).clamp(max=r.vocab_size - 1)
        choice = torch.where(hot, sampled, greedy)
        at_following = following.clamp(max=self.max_len - 1).unsqueeze(1)
        forced = buf.sequence.gather(1, at_following).squeeze(1)
        live = generating & active
        token = torch.where(live, choice, torch.where(generating, torch.full_like(choice, r.eos), forced))

        buf.sum_logprob.add_(torch.where(live, logprobs.gather(1, token.unsqueeze(1)).squeeze(1),
                                         torch.zeros_like(buf.sum_logprob)))
        buf.generated.add_(live.long())
        buf.last_timestamp.copy_(torch.where(live & (token >= r.timestamp_begin), token, buf.last_timestamp))
        # A finished row writes nothing: its last token may sit at the end of the sequence.
        buf.sequence.scatter_(1, at_following, torch.where(live, token, forced).unsqueeze(1))
        buf.previous.copy_(buf.token)
        buf.token.copy_(token)
        buf.position.add_(active.long())
        buf.finished.copy_(buf.finished | (live & (token == r.eos)) | (buf.position >= buf.limit))


_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # a 32-bit integer hash's multiplier; products stay below 2**63


def _uniform(seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """A number in (0, 1) for each row from its seed and position alone (a counter-based hash,
    so a graph replays it and the rows beside a row never change its draws)."""
    h = (seed * 1_000_003 + position) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MIX) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MIX) & _MASK32
    h = h ^ (h >> 16)
    return ((h >> 8).float() + 0.5) / 2.0**24  # 24 bits: exact in float32 (Intel GPUs may lack float64)


def _capture(run: Callable[[], None], runs_before: int, pool: Any = None) -> torch.cuda.CUDAGraph:
    """`run` captured as a CUDA graph, after `runs_before` runs on a side stream that let the
    kernels be chosen outside the capture. Thread-local capture: other threads may use the GPU."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(runs_before):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        run()
    return graph


def _power_of_two_groups(rows: int, largest: int) -> list[int]:
    """`rows` as a sum of powers of two of at most `largest`, largest first (45, 32: 32, 8, 4, 1):
    groups of sizes a graph was captured for, with no padding rows."""
    groups = [largest] * (rows // largest)
    rest = rows % largest
    while rest:
        top = 1 << (rest.bit_length() - 1)
        groups.append(top)
        rest -= top
    return groups


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on a GPU (CUDA, or an Intel GPU where this torch build reports it); None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    info = getattr(getattr(torch, "xpu", None), "mem_get_info", None)
    if device.type == "xpu" and info is not None:
        return int(info(device)[0])
    return None


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device; to a GPU through pinned memory, so that the copy is queued
    behind the device's work instead of waiting for it."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _to_host(*tensors: torch.Tensor) -> list[list[Any]]:
    """Device tensors as lists, with one wait for the device for all of them: every wait gives up
    the interpreter lock, and getting it back can take a switch interval with busy threads around."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.tolist() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for target, t in zip(host, tensors):
        target.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [t.tolist() for t in host]
