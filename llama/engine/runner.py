"""One step on the model, over the state the device keeps per slot: each row's last token and its
position (the next decode step's input), what it has seen and generated (the penalties), its sampling
settings, and its block table (where its positions live in the KV cache pool). The host's side of
each row is ``llama.engine.requests``; which rows run is ``llama.engine.scheduler``'s.

- ``prefill``: a chunk of each admitted row's prefill in one forward pass, right-padded (a padding
  entry lands at a position the row overwrites before reading it, or in the scratch block).
- ``first_tokens``: each row whose prompt is complete samples its first token, eagerly.
- ``decode``: one token for every decoding row, over the first ``width`` slots (idle slots among them
  decode on a position nobody reads, into the scratch block), attending over the rows' blocks up to
  the furthest row. Compiled, its shapes are static: ``width`` is a power of two, the block tables a
  (width, blocks_per_row) tensor, and the attended length a power-of-two bucket of whole blocks, so
  rows coming and going compile nothing new after the first few steps (at most log2(max_batch_size)
  + 1 widths; the length is dynamic below the whole row, which has a graph of its own). With
  ``compile=True`` the whole step is one compiled graph: the model, the sampler of every row with its
  own settings (``llama.engine.sampling``), and the writes of the step's tokens, positions and penalty
  counts. The host waits once a step, to read the tokens. The compiled step holds the whole sampler
  (penalties, sampling, logprobs, ``top_logprobs`` up to the most warmed), the rows' settings as
  tensors: one graph per width and length serves every mix of options (on a CPU, two: a step whose
  rows are all greedy and unpenalised skips the sampler's sort and the penalties), and ``warm_up``
  compiles them all before the first request (a server's start). Each graph is one the compiler's
  cache can store: a later run on the same machine loads it rather than compiling it again. With
  ``compiled_attention="flex"`` (a CPU's default)
  the compiled step's attention reads the rows' blocks where they lie in the pool, with FlexAttention,
  instead of gathering them, and one graph per width serves every length.
- A row with ``json_schema`` / ``json_object`` follows a grammar (``llama.engine.structured``): its allowed
  next tokens are written into ``allowed`` before each step and the sampler takes only those; the
  other rows' masks allow every token, so they share the batch (and the compiled graph) unchanged.
- ``speculate``: k proposals per row (prompt lookup or the draft model, on the same block tables)
  verified in one pass (``llama.engine.speculative``).
- Rows computing with LoRA adapters served per request (``llama.engine.adapters``): each slot's adapter index
  is kept beside its settings, and before every pass of the model the pass's rows' indices become the
  adapted layers' mask (``adapters_for``), cleared after it. An eager pass none of whose rows has an adapter
  computes the base alone; the compiled step always takes the mask while an adapter is resident, so that one
  graph serves every mix of rows.

Under torchrun the sampled tokens are broadcast from rank 0 inside the step, so every rank writes
the same tokens.
"""

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from typing import ContextManager, List, Optional, Sequence, Tuple, Union

import torch

from llama.engine.adapters import Adapters
from llama.engine.requests import Row, Sampled
from llama.engine.sampling import RowSettings, apply_penalties, global_exponentials, sample, seed_key
from llama.layers.kv_cache import SCRATCH_BLOCK, BlockTables, attended_tables, block_starts
from llama.layers.parallel import broadcast_from_rank0, group_size
from llama.model import Transformer
from llama.options import ATTENTIONS, EngineOptions, GenerationOptions

logger = logging.getLogger(__name__)


def power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


FLEX_ON_CPU = torch.torch_version.TorchVersion(torch.__version__) >= (
    2,
    6,
)  # inductor's CPU FlexAttention kernel came in 2.6


def default_compiled_attention(device: torch.device, quantized: bool = False) -> str:
    """FlexAttention on a CPU, where it measured as fast as the gather or faster (``bench/kv_blocks.py
    --sections flex``: 0.84-1.01 of the step's time, and one graph per width instead of two); the
    gather elsewhere, until FlexAttention is measured there, and for a pool stored in 8 bits
    (``quantized``), which FlexAttention reads dequantized whole (``bench/kv_quantized.py --sections decode
    --modes gather flex``: 3.2x the gather's time on the bundled model)."""
    return "flex" if device.type == "cpu" and FLEX_ON_CPU and not quantized else "gather"


def check_compiled_attention(attention: str, device: torch.device) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(f"compiled_attention must be one of {ATTENTIONS}, got {attention!r}")
    if attention == "flex" and device.type not in ("cpu", "cuda"):
        raise ValueError(f'compiled_attention="flex" runs on "cpu" and "cuda", not {device.type!r}: use "gather"')
    if attention == "flex" and device.type == "cpu" and not FLEX_ON_CPU:
        raise ValueError(
            f'compiled_attention="flex" on a CPU needs torch >= 2.6, this is {torch.__version__}: use "gather"'
        )


@dataclass(frozen=True)
class Features:
    """What the running rows need of a step; an eager step skips what they do not need, the
    compiled one runs all of it (``Runner.compiled_features``)."""

    sampling: bool  # some row samples (else every row takes the argmax)
    penalties: bool  # some row has a penalty or a logit bias
    logprobs: bool  # some row wants logprobs (always, compiled: nearly free there, and one graph fewer)
    alternatives: int  # how many top logprobs to compute (a power of two, 0: none)
    constrained: bool = False  # some row follows a grammar: the step takes a mask of allowed tokens


class Runner:
    """The model (and the draft) and the device's per-slot state; each method one pass or one write.

    Args:
        model: the model; its pool's blocks hold every slot's positions.
        options: the slots (``max_batch_size``), their context, the pool's blocks; ``compile``: run the
            decode step (model, sampler and writes) as one ``torch.compile`` graph (on CUDA, replayed as
            CUDA graphs), reading the rows' blocks as ``compiled_attention`` says (``llama.layers.kv_cache``):
            "gather" copies them for scaled_dot_product_attention, "flex" has FlexAttention read them in
            the pool; None: ``default_compiled_attention``. Every other pass gathers.
        draft: a smaller model with the same vocabulary, for ``speculate="draft"``; its pool's blocks are
            the model's, in the same block tables.
        adapters: the LoRA adapters the model serves per request, or None.
    """

    def __init__(
        self,
        model: Transformer,
        options: EngineOptions,
        draft: Optional[Transformer] = None,
        adapters: Optional[Adapters] = None,
    ):
        max_slots, compile = options.max_batch_size, options.compile
        self.model, self.draft, self.max_slots, self.options = model, draft, max_slots, options
        self.adapters = adapters
        params = model.params
        self.device = device = model.output.weight.device
        quantized = options.kv_cache_storage is not None
        compiled_attention = options.compiled_attention or default_compiled_attention(device, quantized)
        check_compiled_attention(compiled_attention, device)
        self.attention = compiled_attention if compile else "gather"  # FlexAttention's fast kernel exists only compiled
        self.block_size = options.block_size
        vocab = params.vocab_size
        # the slots' state on the device: each row's last token and its position (the next decode
        # step's input), what it has seen (prompt and output) and how often it generated each token
        self.tokens = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.seen = torch.zeros(max_slots, vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(max_slots, vocab, dtype=torch.int32, device=device)
        self.settings = RowSettings.empty(max_slots, vocab, device)
        # the index of the adapter each slot's row computes with (``llama.engine.adapters``), 0: none
        self.slot_adapters = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.block_tables = torch.full(
            (max_slots, options.blocks_per_row), SCRATCH_BLOCK, dtype=torch.long, device=device
        )
        # FlexAttention's mask reads where each pool block sits in each row, kept beside the tables
        # (``pool_block_mask``)
        flex = self.attention == "flex"
        self.block_starts = block_starts(self.block_tables, options.kv_cache_blocks, self.block_size) if flex else None
        self.allowed = torch.ones(
            max_slots, vocab, dtype=torch.bool, device=device
        )  # the tokens each row's grammar allows next
        self.no_noise = torch.ones(
            max_slots, vocab, device=device
        )  # a sampling step's noise when no row draws from the global RNG
        self.group = model.group  # the ranks that split the model: each takes rank 0's tokens
        self.distributed = group_size(self.group) > 1
        self.compiled = None
        self.compile_seconds: Optional[float] = None  # the first compiled step, compilation included
        self.warmed_alternatives = 0  # top logprobs every compiled step computes (``warm_up``)
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None
            # inductor's FlexAttention kernel for a CPU cannot take the next operation fused into it (a
            # cast to a bfloat16 model's dtype fails to compile, torch 2.13)
            options = {"epilogue_fusion": False} if self.attention == "flex" and device.type == "cpu" else None
            # under torchrun the tokens are broadcast between choosing and writing them
            step = self.forward_and_choose if self.distributed else self.decode_step
            self.compiled = torch.compile(step, mode=mode, options=options, dynamic=False)

    # --- a row's state ----------------------------------------------------------------------------

    def set_rows(self, options: GenerationOptions, slots: List[int], rows: List[Row], adapter_index: int = 0) -> None:
        """The slots' sampling settings, the index of the adapter their rows compute with (0: none), and what
        their rows have seen and generated."""
        index = torch.tensor(slots, device=self.device)
        self.slot_adapters[index] = adapter_index
        n = options.num_return_sequences
        values = dict(
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            min_p=options.min_p,
            repetition_penalty=options.repetition_penalty,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            seeded=options.seed is not None,
            logprob_scale=1 / options.temperature if options.tempered_logprobs and options.temperature > 0 else 1.0,
        )
        for name, value in values.items():
            getattr(self.settings, name)[index] = value
        if options.seed is not None:  # row i*n + j draws from seed + j
            keys = [seed_key(options.seed + row.index % n) for row in rows]
            self.settings.seed_key[index] = torch.tensor(keys, device=self.device)
        self.settings.logit_bias[index] = 0.0
        if options.logit_bias:
            ids = torch.tensor(list(options.logit_bias), device=self.device)
            biases = torch.tensor(
                list(options.logit_bias.values()), dtype=self.settings.logit_bias.dtype, device=self.device
            )  # ints too
            self.settings.logit_bias[index[:, None], ids] = biases
        self.seen[index] = False
        self.counts[index] = 0
        self.positions[index] = 0
        for row, slot in zip(rows, slots):
            self.seen[slot, torch.tensor(row.sequence, device=self.device)] = True
            if row.tokens:
                generated = torch.tensor(row.tokens, device=self.device)
                self.counts[slot].index_put_(
                    (generated,), torch.ones_like(generated, dtype=self.counts.dtype), accumulate=True
                )

    def set_table(self, slot: int, blocks: List[int]) -> None:
        """The slot's block table: its row's blocks, then the scratch block."""
        self.block_tables[slot] = SCRATCH_BLOCK
        self.block_tables[slot, : len(blocks)] = torch.tensor(blocks, device=self.device)
        if self.block_starts is not None:
            table = self.block_tables[slot : slot + 1]
            self.block_starts[slot] = block_starts(table, self.options.kv_cache_blocks, self.block_size)[0]

    def free(self, slot: int) -> None:
        """The slot's row left it (ended or preempted): no blocks, every token allowed."""
        self.set_table(slot, [])
        self.allowed[slot] = True
        self.slot_adapters[slot] = 0

    def set_allowed(self, slots: List[int], allowed: torch.Tensor) -> None:
        """The slots' allowed next tokens (len(slots), vocab) bool, from their grammars."""
        self.allowed[torch.tensor(slots, device=self.device)] = allowed.to(self.device)

    def resume(self, row: Row) -> None:
        """A row prefilled again after a preemption decodes on from its last token."""
        self.tokens[row.slot], self.positions[row.slot] = row.tokens[-1], row.position

    def adapters_for(
        self, slots: Union[torch.Tensor, slice], rows: Sequence[Optional[Row]], compiled: bool = False
    ) -> ContextManager[None]:
        """The passes inside the block compute each of ``slots`` (the pass's rows, in order) with its row's adapter
        (``rows``: the rows among them; None for a slot without one). A pass that is not ``compiled`` and none of
        whose rows has an adapter computes the base alone."""
        if self.adapters is None:
            return contextlib.nullcontext()
        needed = compiled or any(row is not None and row.options.adapter is not None for row in rows)
        return self.adapters.select(self.slot_adapters[slots], needed)

    # --- passes -----------------------------------------------------------------------------------

    def prefill(self, batch: List[Tuple[Row, int]]) -> torch.Tensor:
        """The next n tokens of each row's prefill (``batch``: (row, n)) into its blocks, in one
        forward pass (the prompt tokens it predicts that a row scores appended to its scores, with
        logits at those positions only). Returns each row's last logits (rows, vocab)."""
        max_seq_len = self.options.max_seq_len
        width = max(n for _, n in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (row, n) in enumerate(batch):
            tokens[i, :n] = torch.tensor(row.target[row.prefilled : row.prefilled + n])
        starts = torch.tensor([row.prefilled for row, _ in batch])
        # a shorter row's padding stays within the rotary table and writes to the scratch block (``lengths``),
        # never over a position of its own
        positions = (starts[:, None] + torch.arange(width)).clamp(max=max_seq_len - 1).to(self.device)
        slots = torch.tensor([row.slot for row, _ in batch], device=self.device)
        tables = self.block_tables[slots]
        ends = torch.tensor([n - 1 for _, n in batch], device=self.device)
        attended = attended_tables(tables, max(row.prefilled + n for row, n in batch), self.block_size)
        cache = BlockTables(attended, lengths=ends + 1)
        scored = [scored_indices(row, n) for row, n in batch]
        tokens = tokens.to(self.device)
        at = ends  # the last position's logits: (rows, 1, vocab)
        if any(scored):  # the scored positions' logits, then the last's: (rows, most scored + 1, vocab)
            k = max(len(indices) for indices in scored) + 1
            at = torch.tensor([indices + [n - 1] * (k - len(indices)) for indices, (_, n) in zip(scored, batch)])
        with self.adapters_for(slots, [row for row, _ in batch]):
            logits = self.model(tokens, positions=positions, cache=cache, logits_at=at.to(self.device))
        if any(scored):
            self.score_prompts(batch, scored, logits[:, :-1])
        last = logits[:, -1]
        if self.draft is not None:  # the draft's cache holds the prompts too
            self.draft(tokens, positions=positions, cache=cache, logits_at=ends)
        self.positions[slots] = (
            (starts + ends.cpu() + 1).clamp(max=max_seq_len - 1).to(self.device)
        )  # where an idle decode may write
        return last

    def score_prompts(self, batch: List[Tuple[Row, int]], scored: List[List[int]], logits: torch.Tensor) -> None:
        """Each row's scores of the prompt tokens its chunk predicts: their logprobs, whether each is
        the most likely token and, for a row that asks for ``top_logprobs``, the likeliest tokens there,
        from the logits (rows, k, vocab) at the chunk's indices ``scored`` (per row, at most k; the index j
        predicts the prompt's token prefilled + j + 1)."""
        k = logits.shape[1]
        targets = [
            [row.prompt[row.prefilled + j + 1] for j in indices] + [0] * (k - len(indices))
            for indices, (row, _) in zip(scored, batch)
        ]
        targets = torch.tensor(targets, device=self.device)  # (rows, k)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(2, targets[..., None])[..., 0].tolist()
        greedy = (logprobs.argmax(dim=-1) == targets).tolist()
        alternatives = max((row.options.top_logprobs for indices, (row, _) in zip(scored, batch) if indices), default=0)
        if alternatives:  # only where asked: a scoring pass otherwise costs what it did
            top = logprobs.topk(alternatives, dim=-1)  # (rows, k, alternatives)
            ids, values = top.indices.tolist(), top.values.tolist()
        for i, (indices, (row, _)) in enumerate(zip(scored, batch)):
            row.prompt_logprobs += chosen[i][: len(indices)]
            row.prompt_greedy += greedy[i][: len(indices)]
            n = row.options.top_logprobs
            if n and indices:
                row.prompt_top_logprobs += [list(zip(ids[i][j][:n], values[i][j][:n])) for j in range(len(indices))]

    def first_tokens(self, rows: List[Row], logits: torch.Tensor) -> List[Sampled]:
        """Sample each row's first token from its prompt's last logits (rows, vocab), eagerly; write
        it as the slot's next input. Returns each row's token."""
        slots = torch.tensor([row.slot for row in rows], device=self.device)
        features = self.features(rows)
        settings = self.settings.rows(slots)
        positions = torch.tensor([len(row.prompt) for row in rows], device=self.device)
        noise = self.noise(rows, features)
        allowed = self.allowed[slots] if features.constrained else None
        chosen = choose(logits, settings, self.seen[slots], self.counts[slots], positions, noise, features, allowed)
        chosen = broadcast_from_rank0(chosen, self.group)
        self.write(slots, chosen, torch.ones_like(chosen, dtype=torch.bool))
        self.positions[slots] = positions
        values = pack(logits, chosen, features, settings.logprob_scale).tolist()
        return [unpack(value, features, row.options) for row, value in zip(rows, values)]

    def decode(self, rows: List[Row]) -> List[Sampled]:
        """One token for each decoding row: the decode step over the first ``width`` slots, which
        cover them (compiled: a power of two of them, and a power-of-two bucket of the rows' blocks).
        Returns each row's token."""
        width = max(row.slot for row in rows) + 1
        if self.compiled is not None:
            width = min(power_of_two_at_least(width), self.max_slots)
        by_slot = {row.slot: row for row in rows}
        live = torch.zeros(width, dtype=torch.bool)
        live[list(by_slot)] = True
        tables = self.decode_tables(width, max(row.position for row in rows) + 1)  # no position reaches past them
        features = self.features(rows) if self.compiled is None else self.compiled_features(rows)
        noise = self.noise([by_slot.get(slot) for slot in range(width)], features)
        live = live.to(self.device)
        with self.adapters_for(slice(0, width), rows, compiled=self.compiled is not None):
            if self.compiled is None:
                message = self.decode_step(tables, live, noise, features)
            else:
                start = time.perf_counter()
                message = self.compiled_step(tables, live, noise, features)
                if self.compile_seconds is None:
                    self.compile_seconds = time.perf_counter() - start
                    logger.info("compiled the decode step in %.1f s", self.compile_seconds)
            values = message.tolist()  # the step's one wait on the device
        return [unpack(values[row.slot], features, row.options) for row in rows]

    def decode_tables(self, width: int, kv_len: int) -> torch.Tensor:
        """The decode step's block tables of the first ``width`` slots, over the blocks it attends: those
        below ``kv_len`` eagerly; compiled, a power-of-two bucket of them (one graph for many lengths),
        or, with FlexAttention, which reads each row's own blocks whatever the length, the whole row (one
        graph per width)."""
        if self.attention == "flex":
            return self.block_tables[:width]
        return attended_tables(self.block_tables[:width], kv_len, self.block_size, bucketed=self.compiled is not None)

    def compiled_step(
        self, tables: torch.Tensor, live: torch.Tensor, noise: torch.Tensor, features: Features
    ) -> torch.Tensor:
        """``decode_step`` compiled; under torchrun the tokens are broadcast between the compiled
        choice and the writes."""
        if not self.distributed:
            return self.compiled(tables, live, noise, features)
        logits, chosen = self.compiled(tables, noise, features)
        return self.commit(logits, chosen, live, features)

    def compiled_features(self, rows: List[Row]) -> Features:
        """The compiled step's features: all of them, the rows' settings choosing in the graph (``choose``),
        so that one graph serves every mix of options; more top logprobs than warmed compile a graph of
        their own. On a CPU, where the sampler's sort costs more than a small model's step, a step whose
        rows are all greedy and unpenalised runs a graph without the sampler and the penalties
        (``sampler_variants``)."""
        needed = self.features(rows)
        alternatives = max(needed.alternatives, self.warmed_alternatives)
        sampler = needed.sampling or needed.penalties or self.device.type == "cuda"
        return Features(sampling=sampler, penalties=sampler, logprobs=True, alternatives=alternatives, constrained=True)

    def sampler_variants(self) -> List[bool]:
        """Whether the compiled step runs the sampler and the penalties, in the graphs it is compiled for:
        both ways on a CPU, always on CUDA (a CUDA graph cannot skip the sort, and it costs little beside
        a GPU model's step). Two graphs rather than a branch in one (``torch.cond``), which would keep
        the compiler's cache from storing the graph: a later run on the machine then loads it instead of
        compiling again."""
        return [True] if self.device.type == "cuda" else [False, True]

    def compiled_widths(self) -> List[int]:
        """The widths a compiled step runs on: the powers of two below the slots, and all the slots."""
        return sorted({min(1 << i, self.max_slots) for i in range(self.max_slots.bit_length() + 1)})

    def warmed_lengths(self) -> List[int]:
        """The attended lengths, in tokens, that compiled passes have graphs for: a bucket of blocks and
        the whole row (``attended_tables``; with FlexAttention the decode step has one graph for both)."""
        max_seq_len = self.options.max_seq_len
        tables = self.block_tables[:1]
        return sorted(
            {
                attended_tables(tables, kv_len, self.block_size, bucketed=True).shape[1] * self.block_size
                for kv_len in (1, max_seq_len)
            }
        )

    def graph_calls(self) -> int:
        """How often warming up calls each compiled graph: CUDA graphs are recorded on a later call than the compile."""
        return 3 if self.device.type == "cuda" else 1

    def warm_up(self, max_top_logprobs: int = 0) -> None:
        """Compile every graph the compiled decode step can need, so that no request waits for a compile:
        each width (``compiled_widths``) and attended length (``warmed_lengths``), each sampler variant,
        with up to ``max_top_logprobs`` alternatives. Run on idle slots (they write into the scratch
        block); draws nothing from the global RNG. Under torchrun every rank calls it, at the same point."""
        vocab = self.model.params.vocab_size
        k = min(power_of_two_at_least(max_top_logprobs), vocab) if max_top_logprobs else 0
        self.warmed_alternatives = max(self.warmed_alternatives, k)
        for width, kv_len, _ in itertools.product(
            self.compiled_widths(), self.warmed_lengths(), range(self.graph_calls())
        ):
            live = torch.zeros(width, dtype=torch.bool, device=self.device)
            for sampler in self.sampler_variants():
                features = Features(sampler, sampler, True, self.warmed_alternatives, constrained=True)
                noise = torch.ones(width, vocab if sampler else 1, device=self.device)
                with self.adapters_for(slice(0, width), [], compiled=True):
                    self.compiled_step(self.decode_tables(width, kv_len), live, noise, features).tolist()

    def decode_step(
        self, tables: torch.Tensor, live: torch.Tensor, noise: torch.Tensor, features: Features
    ) -> torch.Tensor:
        """The whole decode step, compiled as one graph with ``compile``: the model on the last token of
        each of the first ``width`` slots (``tables``: their blocks, ``decode_tables``), each row's
        choice, the writes."""
        logits, chosen = self.forward_and_choose(tables, noise, features)
        return self.commit(logits, chosen, live, features)

    def forward_and_choose(self, tables: torch.Tensor, noise: torch.Tensor, features: Features):
        """(logits (width, vocab), chosen tokens (width,)) of the first ``width`` slots, among the
        tokens their grammars allow (``allowed``) when a row has one."""
        width = tables.shape[0]
        tokens, positions = self.tokens[:width], self.positions[:width]
        cache = BlockTables(tables, None if self.block_starts is None else self.block_starts[:width])
        logits = self.model(tokens[:, None], positions=positions[:, None], cache=cache)[:, 0]
        rows = slice(0, width)
        allowed = self.allowed[rows] if features.constrained else None
        chosen = choose(
            logits,
            self.settings.rows(rows),
            self.seen[rows],
            self.counts[rows],
            positions + 1,
            noise,
            features,
            allowed,
        )
        return logits, chosen

    def commit(
        self, logits: torch.Tensor, chosen: torch.Tensor, live: torch.Tensor, features: Features
    ) -> torch.Tensor:
        """Rank 0's tokens (broadcast under torchrun) become the live rows' next inputs, one position
        further; the rest keep theirs. Returns the step's message (``pack``)."""
        width = chosen.shape[0]
        chosen = broadcast_from_rank0(chosen, self.group)
        tokens = torch.where(live, chosen, self.tokens[:width])
        self.write(torch.arange(width, device=chosen.device), tokens, live)
        self.positions[:width] += live
        return pack(logits, tokens, features, self.settings.logprob_scale[:width])

    def write(self, slots: torch.Tensor, tokens: torch.Tensor, live: torch.Tensor) -> None:
        """The slots' new tokens: their next input, seen, counted (only where ``live``)."""
        self.tokens[slots] = tokens
        self.seen[slots, tokens] = self.seen[slots, tokens] | live
        self.counts[slots, tokens] = self.counts[slots, tokens] + live.int()

    def features(self, rows: List[Row]) -> Features:
        options = [row.options for row in rows]
        k = max((o.top_logprobs for o in options), default=0)
        return Features(
            sampling=any(o.temperature > 0 for o in options),
            penalties=any(
                o.repetition_penalty != 1 or o.presence_penalty or o.frequency_penalty or o.logit_bias for o in options
            ),
            logprobs=self.compiled is not None or any(o.logprobs or o.top_logprobs for o in options),
            alternatives=min(power_of_two_at_least(k), self.model.params.vocab_size) if k else 0,
            constrained=any(o.constrained for o in options),
        )

    def noise(self, rows: List[Optional[Row]], features: Features) -> torch.Tensor:
        """(len(rows), vocab) Exp(1) draws of torch's global RNG for the sampling rows without a seed
        (None: a slot that does not decode), as ``torch.multinomial`` would draw them."""
        vocab = self.model.params.vocab_size
        if not features.sampling:
            return torch.ones(len(rows), 1, device=self.device)
        needs = []
        for row in rows:
            options = None if row is None else row.options
            needs.append(options is not None and options.temperature > 0 and options.seed is None)
        if not any(needs):  # nothing to draw or copy from the host (compiled, every step samples)
            return self.no_noise[: len(rows)]
        return global_exponentials(needs, vocab).to(self.device)


def scored_indices(row: Row, n: int) -> List[int]:
    """The indices in the row's next prefill chunk of n tokens whose logits score a prompt token: position p
    predicts the prompt's token p + 1, scored from ``row.scored_from`` on (none once the row generated)."""
    if row.scored_from is None or row.tokens:
        return []
    first, end = max(row.prefilled, row.scored_from - 1), min(row.prefilled + n, len(row.prompt) - 1)
    return [p - row.prefilled for p in range(first, end)]


def choose(
    logits: torch.Tensor,
    settings: RowSettings,
    seen: torch.Tensor,
    counts: torch.Tensor,
    positions: torch.Tensor,
    noise: torch.Tensor,
    features: Features,
    allowed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Each row's next token (rows,) from its logits (rows, vocab), with its own settings; only
    among the ``allowed`` tokens (rows, vocab) bool, if given (a grammar's mask)."""
    if allowed is not None:
        logits = torch.where(allowed, logits, float("-inf"))
    if features.penalties:  # neutral settings change nothing: one compiled graph serves every mix of rows
        logits = apply_penalties(logits, settings, seen, counts)
    if not features.sampling:
        return torch.argmax(logits, dim=-1)
    return sample(logits, settings, positions, noise)  # a greedy row among sampling ones takes its argmax


def pack(logits: torch.Tensor, tokens: torch.Tensor, features: Features, logprob_scale: torch.Tensor) -> torch.Tensor:
    """The step's message to the host, one float64 row per slot, read in one wait: the token, then
    with ``features.logprobs`` its logprob and the ids and logprobs of the ``features.alternatives`` most
    likely tokens, of the distribution ``softmax(logits * logprob_scale)`` (rows,): the model's own
    (scale 1), or at a ``tempered_logprobs`` row's temperature; no penalty, top-k or top-p is applied.
    logits: (rows, vocab) float32, as the model gives them."""
    columns = [tokens.double()[:, None]]
    if features.logprobs:
        logits = logits * logprob_scale[:, None]  # a tensor of the rows: one compiled graph serves every mix
        normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)  # (rows, 1)
        columns.append((logits.gather(1, tokens[:, None]) - normaliser).double())
        if features.alternatives:
            top = logits.topk(features.alternatives, dim=-1)
            columns += [top.indices.double(), (top.values - normaliser).double()]
    return torch.cat(columns, dim=1)


def unpack(columns: List[float], features: Features, options: GenerationOptions) -> Sampled:
    """One row's token from its ``pack`` columns, with the logprob and the alternatives its request asked for."""
    token, *rest = columns
    alternatives = None
    if options.top_logprobs:
        k, n = features.alternatives, options.top_logprobs
        alternatives = [(int(i), logprob) for i, logprob in zip(rest[1 : 1 + k][:n], rest[1 + k :][:n])]
    return Sampled(int(token), rest[0] if options.logprobs else None, alternatives)
