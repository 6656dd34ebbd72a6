"""Token windows -> per-head state statistics over time (the windows come from ``calibration_text``)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .errors import CompressorError
from .settings import CHUNK, measured_steps
from .families import Family
from .metrics import METRICS, metric_table
from .layers import linear_layers
from .placement import spans_devices
from .state_capture import states_handed_to


@dataclass
class StateStatistics:
    """Per-head state metrics at every chunk boundary.

    ``mean[m]`` and ``std[m]`` are [time, layer, head] float32 over the calibration samples (NaN where a layer
    has fewer heads than the widest one); ``times`` [time] is the number of tokens seen at each boundary;
    ``layers`` the model's indices of its linear-attention layers, ``heads`` their value-head counts and
    ``state_shapes`` their (d_k, d_v).
    """

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    times: torch.Tensor
    layers: list[int]
    heads: list[int]
    state_shapes: list[tuple[int, int]]
    settings: dict = field(default_factory=dict)
    halves: tuple[StateStatistics, StateStatistics] | None = field(default=None, repr=False)
    """The statistics of each half of the windows, when they were collected with ``halves`` (not saved)."""

    def per_layer(self, metric: str) -> dict[int, torch.Tensor]:
        """Layer index -> [head] time-averaged mean of ``metric``."""
        averaged = self.mean[metric].mean(0)
        return {layer: averaged[i, : self.heads[i]] for i, layer in enumerate(self.layers)}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"times": self.times.contiguous()}
        for name in self.mean:
            tensors[f"{name}.mean"] = self.mean[name].contiguous()
            tensors[f"{name}.std"] = self.std[name].contiguous()
        layout = {"layers": self.layers, "heads": self.heads, "state_shapes": self.state_shapes, **self.settings}
        save_file(tensors, folder / "stats.safetensors", metadata={"compressor": json.dumps(layout)})

    @classmethod
    def synthetic(cls, layers: list[int], heads: list[int], state_shapes: list[tuple[int, int]],
                  seed: int = 0) -> StateStatistics:
        """Statistics of the right shape with random metrics (three time steps, no spread), for plans and benchmarks
        that need no calibration: the heads they rank are arbitrary."""
        from .metrics import METRICS

        generator = torch.Generator().manual_seed(seed)
        mean = {name: torch.rand(3, len(layers), max(heads), generator=generator) * 50 for name in METRICS}
        for i, count in enumerate(heads):
            for values in mean.values():
                values[:, i, count:] = float("nan")
        return cls(mean=mean, std={name: torch.zeros_like(v) for name, v in mean.items()},
                   times=torch.tensor([64, 128, 256]), layers=list(layers), heads=list(heads),
                   state_shapes=[tuple(s) for s in state_shapes],
                   settings={"eps": 1e-4, "samples": 4, "seq_len": 256, "tokens": 1024, "source": "synthetic"})

    @classmethod
    def load(cls, folder: Path) -> StateStatistics:
        path = Path(folder) / "stats.safetensors"
        if not path.is_file():
            raise CompressorError(f"no statistics at {path}; run `compress analyze` first.")
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as handle:
                layout = json.loads(handle.metadata()["compressor"])
            tensors = load_file(path)
        except Exception as error:  # SafetensorError, a missing or foreign header: not statistics compressor wrote
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CompressorError(f"{path} is damaged or not statistics of `compress analyze` ({reason}).") from None
        names = sorted({key.rsplit(".", 1)[0] for key in tensors if key != "times"})
        return cls(
            mean={n: tensors[f"{n}.mean"] for n in names},
            std={n: tensors[f"{n}.std"] for n in names},
            times=tensors["times"],
            layers=layout.pop("layers"),
            heads=layout.pop("heads"),
            state_shapes=[tuple(s) for s in layout.pop("state_shapes")],
            settings=layout,
        )


GROUP_MATRICES = 8192
"""MetricSums reduces the states it is handed in groups of at least this many matrices (or what is left at the end):
the spectra kernels run faster on one large batch than on many small ones (docs/benchmarks.md, "Spectra kernels").
8192 float32 states of 128 × 128 hold 0.5 GB."""


class MetricSums:
    """Per layer, the sums over sequences of every head's metrics and of their squares: [H, time, metric] float64
    (:meth:`totals`: by name, [H, time] each).

    :meth:`add` queues one layer's states; once the queue holds ``group`` matrices or more, they are reduced to
    metrics together where they are (on a GPU, without waiting for them). Given a CUDA ``side_device``, the spectra
    run on a low-priority side stream of it, beside the next layers' forward pass, which runs on a high-priority
    stream (:meth:`forward_stream`) at most ``lag`` groups ahead of them (that bounds the states held for them).
    """

    def __init__(self, eps: float, side_device: torch.device | None = None, lag: int = 4,
                 group: int = GROUP_MATRICES):
        self.eps, self.lag, self.group = eps, lag, group
        cuda = side_device is not None and side_device.type == "cuda"
        self.stream = torch.cuda.Stream(side_device, priority=0) if cuda else None
        self.forward = torch.cuda.Stream(side_device, priority=-1) if cuda else None
        self.pending: list[torch.cuda.Event] = []
        self.queue: list[tuple[int, torch.Tensor]] = []
        self.sums: dict[int, torch.Tensor] = {}
        self.squares: dict[int, torch.Tensor] = {}

    def add(self, layer: int, states: torch.Tensor) -> None:
        """Queue the metrics of ``states`` [B, H, time, d_k, d_v] for ``layer``'s sums; reduce the queue once it
        holds ``group`` matrices."""
        self.queue.append((layer, states))
        if sum(queued.shape[:3].numel() for _, queued in self.queue) >= self.group:
            self.flush()

    def flush(self) -> None:
        """Reduce the queued states to metrics and add them to the sums (on the side stream, if there is one)."""
        queue, self.queue = self.queue, []
        if not queue:
            return
        if self.stream is None:
            return self.accumulate(queue)
        self.stream.wait_stream(self.forward)  # the states were made there, wherever this is called from
        with torch.cuda.stream(self.stream):
            self.accumulate(queue)
        for _, states in queue:
            states.record_stream(self.stream)  # not reused by the forward pass before the side stream is done with it
        self.pending.append(self.stream.record_event())
        if len(self.pending) > self.lag:
            self.forward.wait_event(self.pending.pop(0))

    def forward_stream(self):
        """Context for the forward pass: its high-priority stream with a side stream, nothing otherwise."""
        if self.forward is None:
            return contextlib.nullcontext()
        self.forward.wait_stream(torch.cuda.current_stream(self.forward.device))  # weights, token index tensors
        return torch.cuda.stream(self.forward)

    def accumulate(self, queue: list[tuple[int, torch.Tensor]]) -> None:
        """Add the metrics of the queued (layer, states [B, H, time, d_k, d_v]) to the sums: one metric table for all
        the states of one shape."""
        for shape in dict.fromkeys(states.shape[-2:] for _, states in queue):
            group = [(layer, states) for layer, states in queue if states.shape[-2:] == shape]
            tables = metric_table(torch.cat([states.flatten(0, 2) for _, states in group]), self.eps)
            for (layer, states), table in zip(group, tables.split([s.shape[:3].numel() for _, s in group])):
                table = table.view(*states.shape[:3], -1).double()  # [B, H, time, metric]
                if layer not in self.sums:
                    self.sums[layer] = table.new_zeros(table.shape[1:])
                    self.squares[layer] = table.new_zeros(table.shape[1:])
                self.sums[layer] += table.sum(0)
                self.squares[layer] += table.pow(2).sum(0)

    def totals(self) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, dict[str, torch.Tensor]]]:
        """(sums, squares) on the CPU, once every queued reduction is done."""
        self.flush()
        if self.stream is not None:
            self.forward.synchronize()
            self.stream.synchronize()
        by_name = lambda table: {layer: dict(zip(METRICS, t.cpu().unbind(-1))) for layer, t in table.items()}
        return by_name(self.sums), by_name(self.squares)


class _LastStatesTaken(Exception):
    """Raised by the calibration sink once the last linear-attention layer has handed over its states: the rest of
    the forward pass (the layers after it, the norm) changes no state."""


@torch.no_grad()
def collect_state_statistics(
    model: nn.Module,
    family: Family,
    tokens: torch.Tensor,
    batch_size: int = 4,
    eps: float = 1e-4,
    progress: bool = True,
    times: list[int] | None = None,
    overlap: bool = True,
    group: int = GROUP_MATRICES,
    halves: bool = False,
    layer_by_layer=None,
) -> StateStatistics:
    """Run ``tokens`` [N, L] through ``model`` and summarise every head's state at the boundaries ``times``.

    ``times`` are token counts from :func:`measured_steps` (None: every chunk boundary). States never leave the
    layer that made them: each mixer hands its chunk states [B, H, ceil(L/64), d_k, d_v] to a sink that keeps
    the boundaries in ``times`` and reduces them to metrics at once (only those spectra are computed), so
    memory holds a group of them (``group`` matrices, :data:`GROUP_MATRICES` by default) at a time. Each forward
    pass stops once the last linear-attention layer has handed over its states. On a GPU with ``overlap``, the
    spectra of one group run beside the forward pass of the next layers (:class:`MetricSums`), when there is a next
    one: with fewer than ``group`` states in all, they are reduced once, after the last forward pass, and the side
    stream would only add synchronisation.

    With ``halves``, the statistics of the first N // 2 windows and of the rest are kept apart as well
    (``StateStatistics.halves``), from the same forward passes (no batch mixes the two).

    With ``layer_by_layer`` (a ``compressor.sequential.LayerByLayer`` over ``model``, whose weights then stay on
    disk), every batch goes through one decoder layer after another instead of one batch through the model after
    another; each (part, layer)'s sums still add the batches in the same order, so the statistics are the same.
    """
    times = measured_steps(tokens.shape[1]) if times is None else list(times)
    mixers = linear_layers(model, family)
    device = next(model.parameters()).device if layer_by_layer is None else layer_by_layer.device
    overlap = overlap and not spans_devices(model)  # one side stream serves one device
    chunks = torch.tensor([(t + CHUNK - 1) // CHUNK - 1 for t in times], device=device)  # boundary -> chunk
    chunk_count = (tokens.shape[1] + CHUNK - 1) // CHUNK
    state_count = tokens.shape[0] * len(times) * sum(mixer.num_v_heads for mixer in mixers.values())
    summary = MetricSums(eps, device if overlap and state_count >= group else None, group=group)
    half = tokens.shape[0] // 2 if halves and tokens.shape[0] > 1 else 0
    parts = [tokens[:half], tokens[half:]] if half else [tokens]
    batches = [(part, batch) for part, windows in enumerate(parts) for batch in windows.split(batch_size)]
    last_layer = max(mixers)
    part_now = 0

    def before_batch(k: int) -> None:
        nonlocal part_now
        part_now = batches[k][0]

    def sink(layer: int, states: torch.Tensor) -> None:
        """Take a layer's chunk states: every chunk's [B, H, N, d_k, d_v], or (Gated DeltaNet mixers, which read
        ``sink.chunk_index``) those of the measured chunks only, [B, H, len(times), d_k, d_v]."""
        if states.shape[2] == chunk_count:
            states = states.index_select(2, chunks.to(states.device))
        elif states.shape[2] != len(times):
            raise ValueError(f"layer {layer} handed {states.shape[2]} chunk states to the sink; sequences of "
                             f"{tokens.shape[1]} tokens have {chunk_count} (one per {CHUNK} tokens, and the last)")
        summary.add((part_now, layer), states)
        if layer == last_layer:
            raise _LastStatesTaken

    sink.chunk_index = chunks

    with states_handed_to(sink, mixers), summary.forward_stream():
        if layer_by_layer is not None:
            layer_by_layer.run([batch for _, batch in batches], last_layer, before_batch, _LastStatesTaken)
        for part_now, batch in tqdm(batches if layer_by_layer is None else [], desc="calibrating", unit="batch",
                                    disable=not progress):
            with contextlib.suppress(_LastStatesTaken):
                model.model(input_ids=batch.to(device), use_cache=False)
    return _assembled(*summary.totals(), mixers, tokens, parts, times, eps)


def _assembled(sums: dict, squares: dict, mixers: dict[int, nn.Module], tokens: torch.Tensor,
               parts: list[torch.Tensor], times: list[int], eps: float) -> StateStatistics:
    """StateStatistics of all ``tokens`` from the sums keyed by (part, layer), with each part's own as ``halves``
    when there are two parts."""
    layers = sorted(mixers)
    shape = {"layers": layers, "heads": [mixers[i].num_v_heads for i in layers], "times": times,
             "state_shapes": [(mixers[i].head_k_dim, mixers[i].head_v_dim) for i in layers], "eps": eps}
    combined = {layer: [(sums[key], squares[key]) for key in sums if key[1] == layer] for layer in layers}
    stats = _statistics({layer: _added(pairs) for layer, pairs in combined.items()}, tokens, **shape)
    if len(parts) == 2:
        stats.halves = tuple(
            _statistics({layer: (sums[(p, layer)], squares[(p, layer)]) for layer in layers}, parts[p], **shape)
            for p in (0, 1)
        )
    return stats


def _added(pairs: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]):
    """(sums, squares) of several parts, added metric by metric."""
    return tuple({name: sum(pair[i][name] for pair in pairs) for name in METRICS} for i in (0, 1))


def _statistics(totals: dict, tokens: torch.Tensor, layers, heads, times, state_shapes, eps) -> StateStatistics:
    """StateStatistics from per-layer (sums, squares) of every metric [H, time] over the windows ``tokens``."""
    count = tokens.shape[0]
    steps = len(times)
    mean, std = {}, {}
    for name in METRICS:
        m = torch.full((steps, len(layers), max(heads)), float("nan"))
        s = torch.full_like(m, float("nan"))
        for i, layer in enumerate(layers):
            sums, squares = totals[layer]
            average = sums[name] / count  # [H, T']
            variance = (squares[name] / count - average.pow(2)).clamp_min(0)
            m[:, i, : heads[i]] = average.T.float()
            s[:, i, : heads[i]] = variance.sqrt().T.float()
        mean[name], std[name] = m, s
    return StateStatistics(
        mean=mean,
        std=std,
        times=torch.tensor(times),
        layers=layers,
        heads=heads,
        state_shapes=state_shapes,
        settings={"eps": eps, "samples": count, "seq_len": tokens.shape[1], "tokens": int(tokens.numel())},
    )
