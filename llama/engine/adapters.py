"""The LoRA adapters an engine serves per request (``GenerationOptions.adapter``, by name): every adapter
registered is kept on the host as read from peft's files (``llama.checkpoints.peft``), and at most
``max_loras`` of them are resident on the device, in the model's ``MultiLoRALinear`` layers
(``llama.layers.multi_lora``), where the rows of one step compute with each its own.

- Registering checks an adapter against the engine: its shapes and targets were checked against the
  model as it was read; its rank must be at most ``max_lora_rank``, its name new.
- Residency: the first ``max_loras`` adapters registered are on the device from the start. Each resident
  adapter has an index, 1 to ``max_loras`` (0 is the base), and its columns of
  the layers' rank axis follow the previous index's: packed, in index order. Rank 0's scheduler claims
  an index for each request it admits (``claim``): its adapter's own if resident, else an empty one, else
  that of the least recently used adapter no running row computes with, whose adapter leaves the device
  (it stays registered); when every index is held by running rows, the request waits. The step's plan
  carries the loads, and every rank follows them (``assign``, then ``write``: an adapter whose columns
  moved is written again from the host, so the ranks' layers stay alike).
- Loading and unloading while serving (``load``, ``unload``, from any thread on rank 0): a loaded adapter
  is registered at the next step, whose plan names its folder, which every other rank then reads (its slice
  of each tensor goes to its layers); a request may name it as soon as ``load`` returns. An adapter that is
  unloading takes no new request, and leaves once no request computes with it (the plan says so; its index
  on the device is emptied), so that the requests already running with it finish as they would have.
- A pass: ``select`` turns the index of each of its rows into the layers' mask.
"""

import threading
from contextlib import nullcontext
from typing import ContextManager, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from llama.checkpoints.peft import Adapter, read_adapter
from llama.layers.multi_lora import apply_multi_lora
from llama.options import EngineOptions

MIN_COLUMNS = 8  # the smallest bucket of packed ranks a pass computes


class UnknownAdapter(ValueError):
    """An adapter name the engine does not serve."""


class Adapters:
    """The registered adapters and the resident ones; see the module docstring.

    Args:
        model: the loaded model, whose adaptable linears get ``MultiLoRALinear`` layers of
            ``max_loras x max_lora_rank`` columns.
        options: ``max_loras`` (resident at once) and ``max_lora_rank`` (the largest rank registered).
        adapters: the adapters to register, by name.
    """

    def __init__(self, model: nn.Module, options: EngineOptions, adapters: Dict[str, Adapter]):
        self.max_loras, self.max_rank, self.args = options.max_loras, options.max_lora_rank, model.params
        self.capacity = options.max_loras * options.max_lora_rank
        self.rows, self.layers = apply_multi_lora(model, self.capacity)
        weight = model.tok_embeddings.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.registered: Dict[str, Adapter] = {}
        self.lock = threading.Lock()  # guards the registry against the threads that load, unload and submit
        self.arriving: List[Tuple[str, Adapter]] = []  # loaded, registered at the next step
        self.leaving: Dict[str, threading.Event] = {}  # unloading: set once gone
        slots = 1 + options.max_loras  # index 0: the base
        self.resident: List[Optional[str]] = [None] * slots
        self.users = [0] * slots  # the running rows that compute with each index
        self.last_used = [0] * slots  # when a row last took each index (``attach``)
        self.attached = 0
        self.spans: List[Tuple[int, int]] = [(0, 0)] * slots  # each index's [start, end) columns, as written
        self.ranges = torch.zeros(slots, 2, dtype=torch.long, device=self.device)  # ``spans`` on the device
        for name, adapter in adapters.items():
            self.register(name, adapter)
        preloaded = {index: name for index, name in enumerate(list(self.registered)[: self.max_loras], start=1)}
        self.assign(preloaded)  # the first on the device already: a compiled step is warmed up with their columns
        self.write(preloaded)

    # --- the registry -----------------------------------------------------------------------------

    def register(self, name: str, adapter: Adapter) -> None:
        """Serve ``adapter`` as ``name`` (``check_new``)."""
        self.check_new(name, adapter)
        self.registered[name] = adapter

    def check_new(self, name: str, adapter: Adapter) -> None:
        """``adapter`` may be served as ``name``.

        Raises:
            ValueError: the name is taken, or the adapter's rank is over ``max_lora_rank``.
        """
        loaded = {**self.registered, **dict(self.arriving)}
        if name in loaded:
            raise ValueError(f"an adapter named {name!r} is already loaded (from {loaded[name].path})")
        if adapter.config.rank > self.max_rank:
            raise ValueError(
                f"adapter {name!r} ({adapter.path}) has rank {adapter.config.rank}, over "
                f"max_lora_rank={self.max_rank}: serve it with max_lora_rank >= {adapter.config.rank} (--max_lora_rank)"
            )

    @property
    def names(self) -> List[str]:
        """The adapters a request may name: registered or arriving, and not unloading."""
        with self.lock:
            return [name for name in self.registered if name not in self.leaving] + [name for name, _ in self.arriving]

    def check(self, name: Optional[str]) -> None:
        """A request's ``adapter`` must be one served (None: the base)."""
        if name is None:
            return
        names = self.names
        if name not in names:
            loaded = ", ".join(repr(n) for n in names) or "none"
            raise UnknownAdapter(f"adapter {name!r} is not loaded; the loaded adapters: {loaded}")

    def load(self, name: str, folder: str) -> None:
        """Serve the adapter in ``folder`` as ``name`` from the next step on (a request may name it at once).

        Raises:
            ValueError, OSError: the name is taken, the folder holds no adapter of this model (its files, shapes,
                targets), or its rank is over ``max_lora_rank``.
        """
        adapter = read_adapter(folder, self.args)  # outside the lock: reading takes a while
        with self.lock:
            self.check_new(name, adapter)
            self.arriving.append((name, adapter))

    def unload(self, name: str) -> threading.Event:
        """Serve ``name`` no more: no new request may name it, and it leaves once no request computes with it.
        Returns an event set then.

        Raises:
            UnknownAdapter: no adapter of that name is served.
        """
        with self.lock:
            arriving = [entry for entry in self.arriving if entry[0] != name]
            if len(arriving) < len(self.arriving):  # not registered yet: it leaves at once
                self.arriving, gone = arriving, threading.Event()
                gone.set()
                return gone
            if name not in self.registered or name in self.leaving:
                raise UnknownAdapter(f"no adapter named {name!r} is loaded")
            self.leaving[name] = threading.Event()
            return self.leaving[name]

    @property
    def updates(self) -> bool:
        """Whether adapters arrive or leave: a step applies it."""
        return bool(self.arriving or self.leaving)

    def identity(self, name: Optional[str]) -> Optional[str]:
        """What names the adapter's weights in the prefix cache's keys (None: the base)."""
        return None if name is None else self.registered[name].identity

    def index_of(self, name: Optional[str]) -> int:
        """The resident index of ``name`` (0 for None, the base)."""
        return 0 if name is None else self.resident.index(name, 1)

    # --- rank 0's plan ----------------------------------------------------------------------------

    def plan_updates(
        self, in_use: Set[str], loads: Dict[int, Optional[str]]
    ) -> Tuple[List[Tuple[str, str]], List[str]]:
        """The adapters that arrived since the last step (registered here now, rank 0's registry ahead of the
        plan's), as (name, folder), and those leaving that no request of ``in_use`` names, whose indices on the
        device empty (into ``loads``)."""
        with self.lock:
            arriving, self.arriving = self.arriving, []
            self.registered.update(arriving)
            leaving = [name for name in self.leaving if name not in in_use]
        for name in leaving:
            if name in self.resident:
                loads[self.resident.index(name, 1)] = None
        return [(name, adapter.path) for name, adapter in arriving], leaving

    def claim(self, name: Optional[str], loads: Dict[int, str], claimed: Set[int]) -> Optional[int]:
        """The index a request of adapter ``name`` computes with in this step, given the plan's ``loads``
        so far (index -> the adapter it loads) and the indices the plan's earlier admissions ``claimed``: its
        adapter's if resident or loading, else an empty index or the least recently used one no row computes
        with, added to ``loads``. None: every index is held; the request waits."""
        if name is None:
            return 0
        names = [loads.get(i, resident) for i, resident in enumerate(self.resident)]
        if name in names[1:]:
            index = names.index(name, 1)
        else:
            idle = [i for i in range(1, len(names)) if self.users[i] == 0 and i not in claimed]
            if not idle:
                return None
            index = min(idle, key=lambda i: (names[i] is not None, self.last_used[i]))  # empty first, then LRU
            loads[index] = name
        claimed.add(index)
        return index

    # --- every rank, as the plan says -------------------------------------------------------------

    def arrive(self, registrations: List[Tuple[str, str]]) -> None:
        """The plan's arrivals registered on a rank whose registry is behind rank 0's: each rank reads the
        adapter's files (an adapter given to this rank's ``load`` too is taken as read)."""
        with self.lock:
            given = dict(self.arriving)
            self.arriving = [entry for entry in self.arriving if entry[0] not in dict(registrations)]
        for name, folder in registrations:
            if name not in self.registered:
                adapter = given.get(name) or read_adapter(folder, self.args)
                with self.lock:
                    self.registered[name] = adapter

    def leave(self, names: List[str]) -> None:
        """The plan's leaving adapters, no longer on the device, leave the registry."""
        with self.lock:
            for name in names:
                del self.registered[name]
                gone = self.leaving.pop(name, None)
                if gone is not None:
                    gone.set()

    def assign(self, loads: Dict[int, Optional[str]]) -> None:
        """The plan's loads take their indices (on the host; ``write`` puts them on the device)."""
        for index, name in loads.items():
            if self.users[index]:
                raise RuntimeError(f"adapter index {index} is loaded while {self.users[index]} row(s) compute with it")
            self.resident[index] = name

    def attach(self, name: Optional[str]) -> None:
        """A row of adapter ``name`` takes a slot."""
        if name is not None:
            index = self.index_of(name)
            self.attached += 1
            self.users[index], self.last_used[index] = self.users[index] + 1, self.attached

    def detach(self, name: Optional[str]) -> None:
        """A row of adapter ``name`` leaves its slot."""
        if name is not None:
            self.users[self.index_of(name)] -= 1

    def write(self, loads: Dict[int, str]) -> None:
        """The device follows the resident adapters after ``loads``: packed in index order, each adapter
        whose columns moved (or that was loaded) written from the host, the columns past the last zeroed."""
        if not loads:
            return
        spans, start = [(0, 0)], 0
        for name in self.resident[1:]:
            rank = self.registered[name].config.rank if name is not None else 0
            spans.append((start, start + rank))
            start += rank
        written_end = max(end for _, end in self.spans)
        for index, name in enumerate(self.resident):
            if name is not None and (spans[index] != self.spans[index] or index in loads):
                self.write_adapter(self.registered[name], spans[index][0])
        if written_end > start:
            for layer in self.layers.values():
                layer.clear(start, written_end)
        self.spans = spans
        self.ranges.copy_(torch.tensor(spans))

    def write_adapter(self, adapter: Adapter, start: int) -> None:
        """``adapter`` into every layer's columns from ``start`` (zeros where it adapts nothing)."""
        for name, layer in self.layers.items():
            parent = name.rpartition(".")[0]
            modules = {part: f"{parent}.{part}" for part in layer.parts}  # layers.0.attention.wq, ...
            pairs = {part: adapter.tensors[module] for part, module in modules.items() if module in adapter.tensors}
            layer.write(start, adapter.config.rank, pairs, adapter.config.scale)

    # --- a pass -----------------------------------------------------------------------------------

    @property
    def columns(self) -> int:
        """The columns a pass computes: a power-of-two bucket of the packed ranks (0: none resident)."""
        return self.bucket(max(end for _, end in self.spans))

    def bucket(self, used: int) -> int:
        return min(self.capacity, max(MIN_COLUMNS, 1 << (used - 1).bit_length())) if used else 0

    @property
    def buckets(self) -> int:
        """How many widths a pass's columns can take: each a graph of the compiled step's own."""
        return len({self.bucket(used) for used in range(self.capacity + 1)})

    def select(self, index: torch.Tensor, needed: bool = True) -> ContextManager[None]:
        """The passes inside the block compute row b with the adapter of resident index ``index[b]``
        ((rows,) on the device, 0: the base); ``needed`` False (no row has an adapter): the base alone."""
        columns = self.columns
        if not needed or not columns:
            return nullcontext()
        spans = self.ranges[index]  # (rows, 2)
        positions = torch.arange(columns, device=self.device)
        mask = (positions >= spans[:, :1]) & (positions < spans[:, 1:])  # (rows, columns)
        return self.rows.selected(mask.to(self.dtype)[:, None, :])


def check_adapter(adapters: Optional[Adapters], name: Optional[str]) -> None:
    """A request's ``adapter`` must be one the engine serves (None: the base); ``adapters``: the engine's, if any."""
    if name is not None:
        served_adapters(adapters, f"adapter {name!r}: ").check(name)


def served_adapters(adapters: Optional[Adapters], what: str = "") -> Adapters:
    """The engine's adapters; an engine built without any serves none and loads none."""
    if adapters is None:
        raise ValueError(
            f"{what}this model serves no adapters per request; build it with Llama.build(..., adapters={{name: "
            "folder}}) (an empty dict for none yet), or serve it with --lora_modules or --allow_adapter_updates"
        )
    return adapters
