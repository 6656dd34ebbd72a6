"""Calibration text -> token windows -> per-head state statistics over time."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .errors import CompressorError
from .settings import CHUNK, PACKINGS, CalibrationSettings, measured_steps
from .families import Family
from .metrics import METRICS, metric_table
from .layers import linear_layers
from .placement import spans_devices
from .state_capture import states_handed_to

EMBEDDED_CALIBRATION = "python-docs-calib.txt"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl",)
DATASET_PREFIX = "hf:"
LITERAL_PREFIX = "text:"
MAX_CONTROL_SHARE = 0.01
"""A file with more control characters than this share (not tabs, newlines or form feeds) is not text."""


def read_text(source: str | None, text_field: str = "text", split: str = "train", char_budget: int | None = None
              ) -> tuple[str, str]:
    """(text, description): :func:`read_documents` joined by blank lines (documents packed into one stream)."""
    documents, description = read_documents(source, text_field, split, char_budget)
    return "\n\n".join(documents), description


def read_documents(
    source: str | None, text_field: str = "text", split: str = "train", char_budget: int | None = None
) -> tuple[list[str], str]:
    """(documents, description) from one of the calibration sources:

    - None: the embedded Python-docs text (one document);
    - a text file (one document), or a folder of text files (one document per file, sorted by path);
    - a JSON Lines file (``.jsonl``): one document per line, the string in its ``text_field``;
    - ``hf:DATASET[:CONFIG]``: a Hub dataset's ``split``, column ``text_field``, streamed (needs the
      ``datasets`` extra) until ``char_budget`` characters are read (None: the whole split);
    - ``text:LITERAL``: the literal text after the prefix (one document).

    Files that are not text (NUL bytes, invalid UTF-8, many control characters) are refused.
    """
    if source is None:
        text = resources.files("compressor.data").joinpath(EMBEDDED_CALIBRATION).read_text(encoding="utf-8")
        return [text], f"embedded:{EMBEDDED_CALIBRATION} (Python 3.11 documentation, PSF License)"
    if source.startswith(DATASET_PREFIX):
        return read_dataset(source[len(DATASET_PREFIX):], text_field, split, char_budget)
    if source.startswith(LITERAL_PREFIX):
        return [source[len(LITERAL_PREFIX):]], "literal text"
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in JSONL_SUFFIXES:
        return read_json_lines(path, text_field), f"{path} (field {text_field!r})"
    if path.is_file():
        documents = [read_text_file(path)]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CompressorError(f"calibration folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)}).")
        documents = [read_text_file(p) for p in files]
    else:
        raise CompressorError(f"calibration file {source} does not exist (give literal text as text:...).")
    if not any(document.strip() for document in documents):
        raise CompressorError(f"calibration {'file' if path.is_file() else 'folder'} {path} holds no text.")
    return documents, str(path)


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; a file that is not text (an executable, an archive, a model) is refused."""
    data = path.read_bytes()
    if b"\0" in data:
        raise CompressorError(f"{path} is not a text file: it holds NUL bytes.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CompressorError(f"{path} is not UTF-8 text (byte {error.start} cannot be decoded).") from None
    control = sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r\f\v")
    if control > MAX_CONTROL_SHARE * max(len(text), 1):
        raise CompressorError(f"{path} is not a text file: {control} of its {len(text)} characters are control "
                              "characters.")
    return text


def check_source(source: str | None, text_field: str = "text") -> None:
    """Fail early (before a model loads) on a calibration source that cannot be read: a missing file, a bad
    JSON Lines file, an empty folder, or a Hub dataset without the ``datasets`` extra (not streamed here)."""
    if source is not None and source.startswith(DATASET_PREFIX):
        import_datasets(source[len(DATASET_PREFIX):])
    else:
        read_documents(source, text_field)


def import_datasets(name: str):
    """The ``datasets`` module, or a CompressorError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise CompressorError(
            f"reading the Hub dataset {name} needs the datasets extra: pip install 'compressor[datasets]'."
        ) from None
    return datasets

def read_json_lines(path: Path, text_field: str) -> list[str]:
    """The string in ``text_field`` of every non-empty line of the JSON Lines file ``path``."""
    documents = []
    for number, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CompressorError(f"line {number} of {path} is not valid JSON.") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise CompressorError(
                f"line {number} of {path} has no string field {text_field!r}; name the field with --text-field."
            )
        documents.append(record[text_field])
    if not documents:
        raise CompressorError(f"{path} holds no JSON lines.")
    return documents


def read_dataset(name: str, column: str, split: str, char_budget: int | None) -> tuple[list[str], str]:
    """Stream ``column`` of the Hub dataset ``name`` (``ID`` or ``ID:CONFIG``), ``split``, until ``char_budget``
    characters are read: (documents, description)."""
    datasets = import_datasets(name)
    repo, _, config = name.partition(":")
    documents, read = [], 0
    try:
        rows = datasets.load_dataset(repo, config or None, split=split, streaming=True)
        for row in rows:
            if not isinstance(row.get(column), str):
                raise CompressorError(
                    f"the dataset {name} (split {split}) has no text column {column!r}; name it with --text-field."
                )
            documents.append(row[column])
            read += len(row[column])
            if char_budget is not None and read >= char_budget:
                break
    except CompressorError:
        raise
    except Exception as error:  # offline, unknown id, unknown split or config: datasets raises many kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompressorError(
            f"could not stream the Hub dataset {name} (split {split}): {reason.rstrip('.')}."
        ) from None
    if not documents:
        raise CompressorError(f"the dataset {name} (split {split}) has no rows.")
    return documents, f"hf:{name} (split {split}, column {column!r})"


def calibration_windows(settings: CalibrationSettings, tokenizer) -> tuple[torch.Tensor, str]:
    """(calibration windows [samples, seq_len], description of the source)."""
    documents, source = read_documents(settings.calib, settings.text_field, settings.split,
                                       16 * settings.samples * settings.seq_len)
    tokens = token_windows(tokenizer, documents, settings.samples, settings.seq_len, settings.seed,
                           packing=settings.packing)
    return tokens, source


def token_windows(
    tokenizer,
    text: str | list[str],
    samples: int | None,
    seq_len: int,
    seed: int,
    option: str = "--samples",
    packing: str = "pack",
) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens chosen with ``seed`` (None: every window, in order):
    LongTensor [samples, seq_len]. ``option`` names the option to lower in the error message.

    ``text`` is one text or a list of documents. ``packing='pack'`` joins the documents with blank lines and cuts
    the stream into non-overlapping windows (a window may span two documents); ``packing='truncate'`` gives
    every document its own window, its first ``seq_len`` tokens, and skips documents shorter than that (no
    padding: pad tokens would enter the states).
    """
    if packing not in PACKINGS:
        raise CompressorError(f"--packing must be one of {', '.join(PACKINGS)}, got '{packing}'.")
    documents = [text] if isinstance(text, str) else list(text)
    length_option = option.replace("samples", "seq-len")
    if packing == "truncate":
        encoded = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
        windows = [ids[:seq_len] for ids in encoded if len(ids) >= seq_len]
        if samples is None:
            samples = len(windows)
        if len(windows) < max(samples, 1):
            raise CompressorError(
                f"{len(windows)} of {len(documents)} documents have at least {seq_len} tokens, but "
                f"{max(samples, 1)} samples were asked (--packing truncate skips shorter documents); lower {option} "
                f"or {length_option}, give more documents, or use --packing pack."
            )
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(windows), generator=generator)[:samples].sort().values
        return torch.tensor([windows[i] for i in chosen.tolist()], dtype=torch.long)
    ids = tokenizer("\n\n".join(documents), add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // seq_len
    every = samples is None
    if every:
        samples = available
    if available < max(samples, 1):
        asked = "" if every else f" but {samples:,} were asked"
        raise CompressorError(
            f"the text has {len(ids):,} tokens, enough for {available:,} samples of {seq_len:,} tokens{asked}; lower "
            f"{length_option if every else f'{option} or {length_option}'}, or give more text."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=generator)[:samples].sort().values * seq_len
    ids = torch.tensor(ids, dtype=torch.long)
    return torch.stack([ids[start : start + seq_len] for start in starts.tolist()])


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
