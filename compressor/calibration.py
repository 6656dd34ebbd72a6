"""Calibration text -> token windows -> per-head state statistics over time."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .errors import CompressorError
from .families import Family
from .metrics import METRICS, state_metrics
from .slicing import linear_layers

EMBEDDED_CALIBRATION = "python-docs-calib.txt"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def read_text(source: str | None) -> tuple[str, str]:
    """(text, description) from a file, a folder of text files, literal text, or the embedded default (None)."""
    if source is None:
        text = resources.files("compressor.data").joinpath(EMBEDDED_CALIBRATION).read_text(encoding="utf-8")
        return text, f"embedded:{EMBEDDED_CALIBRATION} (Python 3.11 documentation, PSF License)"
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CompressorError(f"calibration folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)}).")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files), str(path)
    if not any(c.isspace() for c in source.strip()):  # one word: a mistyped path, not a text to calibrate on
        raise CompressorError(f"calibration file {source} does not exist.")
    return source, "literal text"


def token_windows(
    tokenizer, text: str, samples: int | None, seq_len: int, seed: int, option: str = "--samples"
) -> torch.Tensor:
    """``samples`` non-overlapping windows of ``seq_len`` tokens chosen with ``seed`` (None: every window, in
    order): LongTensor [samples, seq_len]. ``option`` names the option to lower in the error message."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // seq_len
    if samples is None:
        samples = available
    if available < max(samples, 1):
        length_option = option.replace("samples", "seq-len")
        raise CompressorError(
            f"the text has {len(ids)} tokens, enough for {available} samples of {seq_len} tokens but {max(samples, 1)} "
            f"were asked; lower {option} or {length_option}, or give more text."
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
    def load(cls, folder: Path) -> StateStatistics:
        path = Path(folder) / "stats.safetensors"
        if not path.is_file():
            raise CompressorError(f"no statistics at {path}; run `compress analyze` first.")
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            layout = json.loads(handle.metadata()["compressor"])
        tensors = load_file(path)
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


@torch.no_grad()
def collect_state_statistics(
    model: nn.Module,
    family: Family,
    tokens: torch.Tensor,
    batch_size: int = 4,
    eps: float = 1e-4,
    progress: bool = True,
) -> StateStatistics:
    """Run ``tokens`` [N, L] through ``model`` and summarise every head's state at every chunk boundary.

    States never leave the layer that made them: each mixer hands its chunk states [B, H, T/64, d_k, d_v] to a
    sink that reduces them to metrics at once, so memory holds one layer's states of one batch at a time.
    """
    mixers = linear_layers(model, family)
    sums: dict[int, dict[str, torch.Tensor]] = {}
    squares: dict[int, dict[str, torch.Tensor]] = {}

    def sink(layer: int, states: torch.Tensor) -> None:
        for name, values in state_metrics(states, eps).items():  # values [B, H, T']
            values = values.double().cpu()
            sums.setdefault(layer, {}).setdefault(name, torch.zeros(values.shape[1:], dtype=torch.float64))
            squares.setdefault(layer, {}).setdefault(name, torch.zeros(values.shape[1:], dtype=torch.float64))
            sums[layer][name] += values.sum(0)
            squares[layer][name] += values.pow(2).sum(0)

    device = next(model.parameters()).device
    for mixer in mixers.values():
        mixer.state_sink = sink
    try:
        batches = tokens.split(batch_size)
        for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            model.model(input_ids=batch.to(device), use_cache=False)
    finally:
        for mixer in mixers.values():
            mixer.state_sink = None

    count = tokens.shape[0]
    layers = sorted(mixers)
    heads = [mixers[i].num_v_heads for i in layers]
    steps = next(iter(sums.values()))["threshold_rank"].shape[-1]
    mean, std = {}, {}
    for name in METRICS:
        m = torch.full((steps, len(layers), max(heads)), float("nan"))
        s = torch.full_like(m, float("nan"))
        for i, layer in enumerate(layers):
            average = sums[layer][name] / count  # [H, T']
            variance = (squares[layer][name] / count - average.pow(2)).clamp_min(0)
            m[:, i, : heads[i]] = average.T.float()
            s[:, i, : heads[i]] = variance.sqrt().T.float()
        mean[name], std[name] = m, s
    chunk = 64
    times = torch.clamp(torch.arange(1, steps + 1) * chunk, max=tokens.shape[1])
    return StateStatistics(
        mean=mean,
        std=std,
        times=times,
        layers=layers,
        heads=heads,
        state_shapes=[(mixers[i].head_k_dim, mixers[i].head_v_dim) for i in layers],
        settings={"eps": eps, "samples": count, "seq_len": tokens.shape[1], "tokens": int(tokens.numel())},
    )
