"""A linear-attention layer's decode step, recorded once as a CUDA graph and replayed.

Shipped inside output folders (imports only torch). At the batch sizes people decode at, an eager decode step
waits on the host: one token through a Gated DeltaNet layer is a few dozen small kernels, each launched from
Python, and the GPU finishes each before the next is launched. A CUDA graph records those kernels once and
launches them all with one call. A recorded step reads the layer's weights and three tensors: the token's hidden
state (copied into the graph's own input tensor) and the cache's convolution and recurrent states, which the step
updates in place (``fla_decode_step``). So a graph stays valid for as long as the weights and those two states stay
where they are in memory, and ``DecodeGraph`` keys it on their addresses and shapes.

The first step with a new key runs eagerly (a new cache: its kernels compile and autotune there, outside any
capture); the next step with the same key records the graph, and every later one replays it. A record goes into the
memory pool of the last graph recorded for the same device and stream while that graph lives (a pool whose graphs
are all gone cannot take new ones), so the layers of a model share one pool: a graph's temporaries are dead once its
output has been copied out, which ``DecodeGraph`` does after every replay, so graphs may replay in any order.

Shapes: hidden [B, 1, D] -> [B, 1, D]; the states as the layer's cache keeps them.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
"""Device -> the side stream every decode graph on it is recorded on (the caching allocator hands a block freed by
one capture to the next only on the same stream, so one stream lets the graphs share their temporaries)."""

LAST_RECORDED: dict[tuple[torch.device, int], weakref.ref] = {}
"""(device, the stream a graph was recorded for) -> the graph recorded last for them (a weak reference)."""


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream decode graphs on ``device`` are recorded on, made on first use."""
    if device not in CAPTURE_STREAMS:
        CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return CAPTURE_STREAMS[device]


def shared_pool(place: tuple[torch.device, int]) -> tuple | None:
    """The memory pool of the last graph recorded for ``place`` (device, stream) if that graph lives, else None
    (a new pool). Graphs replayed on one stream run one after another, so they may share temporaries; graphs of
    another stream get a pool of their own."""
    graph = LAST_RECORDED[place]() if place in LAST_RECORDED else None
    return None if graph is None else graph.pool()


class DecodeGraph:
    """One layer's recorded decode step, for the cache and weights it last saw. Not for two ``generate`` calls on
    one model at the same time. Copies and pickles of it start empty (a CUDA graph cannot be copied)."""

    def __init__(self):
        self.key: tuple | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.failed = False
        self.captures = 0
        self.replays = 0

    def __reduce__(self):
        return type(self), ()

    def __call__(
        self, step: Callable[..., torch.Tensor], hidden: torch.Tensor, states: Sequence[torch.Tensor],
        parameters: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """``step(hidden, *states)`` for hidden [B, 1, D] -> [B, 1, D]: eagerly the first time a key is seen, from a
        graph after that. ``states``: the tensors the step updates in place (the cache's); ``parameters``: every
        other tensor it reads (the layer's weights and buffers)."""
        key = (hidden.shape, hidden.dtype, hidden.device, torch.is_inference_mode_enabled(),
               *((state.data_ptr(), state.shape, state.stride(), state.dtype) for state in states),
               *((parameter.data_ptr(), parameter.shape, parameter.dtype) for parameter in parameters))
        if key != self.key or self.failed:
            self.key, self.graph, self.input, self.output = key, None, None, None
            return step(hidden, *states)
        if self.graph is None and not self.capture(step, hidden, states):
            return step(hidden, *states)
        with torch.cuda.device(hidden.device):  # a graph replays on the current device's stream
            self.input.copy_(hidden)
            self.graph.replay()
        self.replays += 1
        return self.output.clone()

    def capture(self, step: Callable[..., torch.Tensor], hidden: torch.Tensor, states: Sequence[torch.Tensor]) -> bool:
        """Record ``step`` (hidden [B, 1, D], states) on the device's capture stream; nothing runs, the states are
        untouched. On failure, warn and keep this layer eager; returns whether it recorded."""
        self.input = hidden.clone()
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(hidden.device)
        place = (hidden.device, current.cuda_stream)
        side = capture_stream(hidden.device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(pool=shared_pool(place), capture_error_mode="thread_local")
                try:
                    self.output = step(self.input, *states)
                finally:
                    graph.capture_end()
        except Exception as error:  # an operation a graph cannot hold: this layer stays eager
            cause = error.__context__ or error  # capture_end's own error hides the step's
            logger.warning("decode steps of this layer run eagerly: recording a CUDA graph failed (%s)", cause)
            self.failed, self.input, self.output = True, None, None
            return False
        finally:
            current.wait_stream(side)
        self.graph = graph
        LAST_RECORDED[place] = weakref.ref(graph)
        self.captures += 1
        return True
