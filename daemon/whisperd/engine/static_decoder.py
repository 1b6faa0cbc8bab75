"""A batched Whisper window decoder with a static KV cache, for GPUs (and the same code on CPUs).

transformers' `generate()` spends most of a step in Python: the decoder's kernels are launched one
by one and the timestamp rules loop over the batch on the host. On a GPU that bounds whisper-base
at a few hundred times real time whatever the batch. Here:

- the encoder runs once per batch, and each layer's cross-attention keys and values are computed
  once per window;
- self-attention keys and values go into a cache allocated once for the longest sequence (448
  tokens), so every step has the same shapes;
- one step (embedding, all layers, logits, Whisper's token rules, greedy or sampled choice, the
  running log-probability) is a fixed sequence of tensor operations with no host synchronisation,
  which CUDA captures once per batch-size bucket as a graph and replays per token;
- rows that finished, and the padding rows of a bucket, are masked rather than removed.

The rules on the finished token lists (fallback, no-speech skip, segment cuts) are in
`window_rules`. The model's layers are called as modules, so IPEX-LLM's low-bit layers and plain
torch layers run through the same code; only CUDA gets graphs (`use_graphs`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

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
    these addresses)."""

    def __init__(self, batch: int, layers: int, heads: int, head_dim: int, audio_ctx: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        def zeros(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=kind, device=device)

        self.batch = batch
        self.self_k = zeros(layers, batch, heads, max_len, head_dim)
        self.self_v = zeros(layers, batch, heads, max_len, head_dim)
        self.cross_k = zeros(layers, batch, heads, audio_ctx, head_dim)
        self.cross_v = zeros(layers, batch, heads, audio_ctx, head_dim)
        self.position = zeros(1, kind=torch.long)  # the position of `token` in every row
        self.token = zeros(batch, kind=torch.long)  # the token at `position`
        self.previous = zeros(batch, kind=torch.long)  # the token before it
        self.sequence = zeros(batch, max_len, kind=torch.long)  # prefix (forced), then what was chosen
        self.prefix_len = zeros(batch, kind=torch.long)
        self.sot_position = zeros(batch, kind=torch.long)
        self.temperature = zeros(batch, kind=torch.float32)
        self.finished = zeros(batch, kind=torch.bool)
        self.generated = zeros(batch, kind=torch.long)  # tokens chosen so far, end-of-text included
        self.sum_logprob = zeros(batch, kind=torch.float32)
        self.last_timestamp = zeros(batch, kind=torch.long)  # -1: none chosen yet
        self.no_speech_prob = zeros(batch, kind=torch.float32)

    CACHES = ("self_k", "self_v", "cross_k", "cross_v")

    def step_state(self) -> dict[str, torch.Tensor]:
        """The per-row state a step moves on, without the key/value caches: a step only reads the
        cross-attention cache, and writes the self-attention cache at its position before it reads
        it (later positions are masked), so running extra steps leaves nothing to undo there. The
        caches are most of the memory (large-v3 at batch 128: 31 GB), so they are never copied."""
        return {name: t for name, t in vars(self).items() if isinstance(t, torch.Tensor) and name not in self.CACHES}


class StaticCacheDecoder:
    """Decodes batches of 30 s windows with a static cache; see the module docstring."""

    def __init__(self, model: torch.nn.Module, rules: TokenRules, *, max_batch: int = 128,
                 use_graphs: bool | None = None) -> None:
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
        self.max_batch = max_batch
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self._buffers: dict[int, _Buffers] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._constants()

    def _constants(self) -> None:
        r, vocab = self.rules, self.rules.vocab_size
        ids = torch.arange(vocab, device=self.device)
        self.vocab_ids = ids
        self.is_timestamp = ids >= r.timestamp_begin
        self.is_text = ids < r.eos
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
        """The batch size a decode of `rows` windows runs at: a power of two, so few graphs exist."""
        size = 1
        while size < rows:
            size *= 2
        return min(size, max(self.max_batch, rows))

    @torch.inference_mode()
    def decode(self, features: torch.Tensor, prefixes: Sequence[Prefix], temperatures: Sequence[float], *,
               fixed_tokens: int | None = None) -> list[Attempt]:
        """Decode each window (features: (rows, n_mels, 3000)) after its prefix (start-of-transcript,
        language, task; a prompt before them) at its temperature (0: greedy). `fixed_tokens` runs
        exactly that many steps after the prefix whatever the rows chose (for speed measurements)."""
        rows = features.shape[0]
        out: list[Attempt] = []
        for start in range(0, rows, self.max_batch):
            stop = min(rows, start + self.max_batch)
            out.extend(self._decode_bucket(features[start:stop], prefixes[start:stop], temperatures[start:stop],
                                           fixed_tokens))
        return out

    def warm_up(self, batch_sizes: Sequence[int], n_mels: int) -> None:
        """Capture the graphs (and pick the kernels) for these batch sizes now, before any job waits."""
        for size in sorted({self.bucket(b) for b in batch_sizes}):
            features = torch.zeros(size, n_mels, 3000, dtype=self.dtype, device=self.device)
            self.decode(features, [Prefix((self.rules.eos,))] * size, [0.0] * size)

    # -- one bucket -------------------------------------------------------------------------------

    def _decode_bucket(self, features: torch.Tensor, prefixes: Sequence[Prefix], temperatures: Sequence[float],
                       fixed_tokens: int | None = None) -> list[Attempt]:
        rows = features.shape[0]
        size = self.bucket(rows)
        buf = self._buffers_for(size)
        self._load(buf, features, prefixes, temperatures)
        longest_prefix = max(len(p.tokens) for p in prefixes)
        step = self._graph_step(buf) if self.use_graphs else (lambda: self._step(buf))
        check_every = 8
        steps = self.max_len - 1 if fixed_tokens is None else min(self.max_len - 1, longest_prefix + fixed_tokens)
        for count in range(steps):
            step()
            if (fixed_tokens is None and count >= longest_prefix and count % check_every == check_every - 1
                    and bool(buf.finished.all())):
                break
        return self._attempts(buf, rows)

    def _buffers_for(self, size: int) -> _Buffers:
        if size not in self._buffers:
            self._buffers[size] = _Buffers(size, len(self.layers), self.heads, self.head_dim, self.audio_ctx,
                                           self.max_len, self.dtype, self.device)
        return self._buffers[size]

    def _load(self, buf: _Buffers, features: torch.Tensor, prefixes: Sequence[Prefix],
              temperatures: Sequence[float]) -> None:
        """Encode the windows, fill each layer's cross-attention keys and values, reset the state."""
        rows, size = features.shape[0], buf.batch
        encoded = self.model.get_encoder()(features.to(self.dtype)).last_hidden_state
        for i, layer in enumerate(self.layers):
            attention = layer.encoder_attn
            buf.cross_k[i, :rows] = self._heads_first(attention.k_proj(encoded))
            buf.cross_v[i, :rows] = self._heads_first(attention.v_proj(encoded))
            if rows < size:
                buf.cross_k[i, rows:] = 0
                buf.cross_v[i, rows:] = 0
        sequence = torch.full((size, self.max_len), self.rules.eos, dtype=torch.long)
        prefix_len = torch.ones(size, dtype=torch.long)
        sot = torch.zeros(size, dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            sequence[row, :len(prefix.tokens)] = torch.tensor(prefix.tokens, dtype=torch.long)
            prefix_len[row] = len(prefix.tokens)
            sot[row] = prefix.sot_position
        temperature = torch.zeros(size, dtype=torch.float32)
        temperature[:rows] = torch.tensor(list(temperatures), dtype=torch.float32)
        finished = torch.zeros(size, dtype=torch.bool)
        finished[rows:] = True
        buf.sequence.copy_(sequence)
        buf.prefix_len.copy_(prefix_len)
        buf.sot_position.copy_(sot)
        buf.temperature.copy_(temperature)
        buf.finished.copy_(finished)
        buf.token.copy_(sequence[:, 0])
        buf.previous.fill_(self.rules.eos)
        buf.position.zero_()
        buf.generated.zero_()
        buf.sum_logprob.zero_()
        buf.last_timestamp.fill_(-1)
        buf.no_speech_prob.zero_()

    def _heads_first(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def _attempts(self, buf: _Buffers, rows: int) -> list[Attempt]:
        sequence = buf.sequence[:rows].cpu().tolist()
        prefix_len = buf.prefix_len[:rows].cpu().tolist()
        generated = buf.generated[:rows].cpu().tolist()
        sum_logprob = buf.sum_logprob[:rows].cpu().tolist()
        no_speech = buf.no_speech_prob[:rows].cpu().tolist()
        out = []
        for row in range(rows):
            tokens = tuple(sequence[row][prefix_len[row]:prefix_len[row] + generated[row]])
            count = max(1, generated[row])
            out.append(Attempt(tokens=tokens, avg_logprob=sum_logprob[row] / count, no_speech_prob=no_speech[row]))
        return out

    # -- the step ---------------------------------------------------------------------------------

    def _graph_step(self, buf: _Buffers):  # noqa: ANN202 - a callable that runs one step
        """The step as a CUDA graph for this bucket, captured on first use."""
        size = buf.batch
        if size not in self._graphs:
            state = {name: t.clone() for name, t in buf.step_state().items()}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # let the kernels be chosen outside the capture
                    self._step(buf)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use the GPU
                self._step(buf)
            for name, t in state.items():  # the warm-up and the capture moved the state on
                getattr(buf, name).copy_(t)
            self._graphs[size] = graph
            log.debug("decoder step captured", extra={"batch": size})
        return self._graphs[size].replay

    def _step(self, buf: _Buffers) -> None:
        """Feed `token` at `position`, choose the token after it, advance. No host synchronisation."""
        logits = self._logits(buf)
        self._choose(buf, logits)

    def _logits(self, buf: _Buffers) -> torch.Tensor:
        decoder, size = self.decoder, buf.batch
        position = buf.position
        x = decoder.embed_tokens(buf.token) + decoder.embed_positions.weight.index_select(0, position)
        x = x.unsqueeze(1)  # (batch, 1, d_model)
        visible = (self.key_positions <= position).view(1, 1, 1, self.max_len)
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            q = self._heads_first(attention.q_proj(h))
            buf.self_k[i].index_copy_(2, position, self._heads_first(attention.k_proj(h)))
            buf.self_v[i].index_copy_(2, position, self._heads_first(attention.v_proj(h)))
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
        generating = following >= buf.prefix_len
        first = following == buf.prefix_len
        at_sot = position == buf.sot_position
        no_speech = torch.softmax(logits, dim=-1)[:, r.no_speech]
        buf.no_speech_prob.copy_(torch.where(at_sot, no_speech, buf.no_speech_prob))

        last_is_time = (chosen_before >= 1) & (buf.token >= r.timestamp_begin)
        penultimate_is_time = (chosen_before < 2) | (buf.previous >= r.timestamp_begin)
        has_time = buf.last_timestamp >= 0
        time_floor = torch.where(last_is_time & ~penultimate_is_time, buf.last_timestamp, buf.last_timestamp + 1)
        banned = self.suppress.unsqueeze(0) | (first.unsqueeze(1) & self.begin_suppress.unsqueeze(0))
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
        gumbel = -torch.log(-torch.log(torch.rand_like(scores).clamp_(1e-20, 1.0)))
        sampled = (scores / buf.temperature.clamp(min=1e-6).unsqueeze(1) + gumbel).argmax(dim=-1)
        choice = torch.where(hot, sampled, greedy)
        forced = buf.sequence.index_select(1, following.clamp(max=self.max_len - 1)).squeeze(1)
        live = generating & ~buf.finished
        token = torch.where(live, choice, torch.where(generating, torch.full_like(choice, r.eos), forced))

        buf.sum_logprob.add_(torch.where(live, logprobs.gather(1, token.unsqueeze(1)).squeeze(1),
                                         torch.zeros_like(buf.sum_logprob)))
        buf.generated.add_(live.long())
        buf.last_timestamp.copy_(torch.where(live & (token >= r.timestamp_begin), token, buf.last_timestamp))
        buf.finished.copy_(buf.finished | (live & (token == r.eos)))
        buf.sequence.index_copy_(1, following.clamp(max=self.max_len - 1),
                                 torch.where(generating, token, forced).unsqueeze(1))
        buf.previous.copy_(buf.token)
        buf.token.copy_(token)
        buf.position.add_(1)
