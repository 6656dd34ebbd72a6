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

``RecordedDecodeSteps`` is the forward of a mixer that keeps its states in transformers' linear-attention cache (a
convolution state and a recurrent state per layer) and takes its decode steps from such a graph.

Shapes: hidden [B, 1, D] -> [B, 1, D]; the states as the layer's cache keeps them.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from functools import partial

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


class RecordedDecodeSteps:
    """Forward of a linear-attention mixer whose states live in transformers' cache (``get_conv_state``,
    ``get_recurrent_state``), its decode steps on CUDA replayed from a ``DecodeGraph`` where a replay computes what
    the step would.

    Subclasses define ``mix`` (the layer's computation), ``steps_in_place`` and ``recurrence`` (the class's own; a
    different one set on an instance, as calibration does, keeps its steps eager), and give every instance a
    ``_decode_graph``.
    """

    recurrence: Callable
    _decode_graph: DecodeGraph

    query_scale: float | None = None
    """The queries' scale when it is not the kernels' d_k^-0.5: a layer with removed query/key channels keeps the
    scale of its source's d_k, which ``recur`` passes to the recurrence."""

    use_decode_graph: bool = True
    """Whether decode steps on CUDA replay a recorded CUDA graph where they can; set it to False on a model's mixers
    to run every step eagerly."""

    def mix(self, hidden_states, conv_state=None, recurrent_state=None, cache=None, stepping: bool = False):
        """hidden [B, T, D] -> [B, T, D] from the cache's states (None: none yet). ``stepping``: one token after a
        cached conv_state [B, C, W], updated in place, as the recurrent state [B, H, K, V] is where
        ``steps_in_place``; otherwise ``cache`` (if any) receives the new states."""
        raise NotImplementedError

    def steps_in_place(self, recurrent_state) -> bool:
        """Whether this layer's decode step writes the new state over ``recurrent_state`` (a graph's replay must)."""
        raise NotImplementedError

    def recur(self, q, k, v, g, beta, recurrent_state, cache):
        """``self.recurrence`` at ``query_scale`` over q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H(, K)] from
        ``recurrent_state`` [B, H, K, V] (None: zeros). Returns (o [B, T, H, V], what ``cache`` takes: the final state
        [B, H, K, V], None without cache or state).

        A cache recording the past for a rollback (assisted generation) keeps the state it had: the recurrence
        starts from a copy, as a decode step may write over its initial state. Where it asks for the states after
        each of its last N tokens (``get_recurrent_states_to_keep``, transformers >= 5.25), those tokens run one step
        at a time after the chunked form over the others, as in transformers' own layers, and the cache takes the
        list of their states."""
        recording = cache is not None and cache.is_recording_past(self.layer_idx)
        states_to_keep = getattr(cache, "get_recurrent_states_to_keep", None) if recording else None
        keep = 0 if states_to_keep is None else min(states_to_keep(self.layer_idx) or 0, q.shape[1])
        if keep == 0:
            initial = recurrent_state.clone() if recording and recurrent_state is not None else recurrent_state
            return self.recurrence(q, k, v, g, beta, initial_state=initial,
                                   output_final_state=cache is not None or recurrent_state is not None,
                                   scale=self.query_scale)
        split = q.shape[1] - keep
        spans = [(0, split)] * (split > 0) + [(t, t + 1) for t in range(split, q.shape[1])]
        outputs, states, state = [], [], recurrent_state
        for start, end in spans:
            out, state = self.recurrence(*(x[:, start:end] for x in (q, k, v, g, beta)),
                                         initial_state=None if state is None else state.clone(),
                                         output_final_state=True, scale=self.query_scale)
            outputs.append(out)
            if end > split:
                states.append(state)
        return torch.cat(outputs, dim=1), states

    def forward(self, hidden_states, cache=None, attention_mask=None, cache_params=None, **kwargs):
        """hidden [B, T, D] -> [B, T, D]. transformers >= 5.24 passes the cache as `cache`, older as `cache_params`."""
        cache = cache if cache is not None else cache_params
        if attention_mask is not None:
            hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
        conv_state = recurrent_state = None
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx, state_idx=0)
            recurrent_state = cache.get_recurrent_state(self.layer_idx, state_idx=0)
        stepping = hidden_states.shape[1] == 1 and conv_state is not None and not cache.is_recording_past(self.layer_idx)
        if stepping and self.graphable(hidden_states, recurrent_state):
            return self._decode_graph(partial(self.mix, stepping=True), hidden_states, (conv_state, recurrent_state),
                                      [*self.parameters(), *self.buffers()])
        return self.mix(hidden_states, conv_state, recurrent_state, cache, stepping)

    def graphable(self, hidden_states: torch.Tensor, recurrent_state: torch.Tensor | None) -> bool:
        """Whether this decode step may come from a recorded graph: on CUDA, outside autograd, autocast (whose
        cached casts die with it), compilation and any other capture, the recurrent state updated in place, the
        class's own recurrence, and submodules whose forward a replay would not run: none with hooks (accelerate's
        move or swap weights, others would stop firing) and no peft adapter layers (their switches are Python
        flags)."""
        return (self.use_decode_graph and hidden_states.is_cuda and self.steps_in_place(recurrent_state)
                and self.recurrence is type(self).recurrence
                and not torch.is_autocast_enabled("cuda") and not torch.compiler.is_compiling()
                and not torch.cuda.is_current_stream_capturing() and self.submodules_replayable())

    def submodules_replayable(self) -> bool:
        """Whether a replay runs what this layer's submodules would: none has hooks or is a peft adapter layer."""
        return not any(hasattr(module, "_hf_hook") or module._forward_hooks or module._forward_pre_hooks
                       or hasattr(module, "base_layer") for module in self.modules() if module is not self)
