"""Recovery after pruning: distil the unpruned source (the teacher) into a pruned folder (the student).

``compress heal PRUNED --teacher SOURCE --out DIR`` trains the pruned model to match the teacher's next-token
distributions and writes a normal pruned folder again (same shipped code, same config and head counts, tokenizer
files, ``compression.json`` with a ``recovery`` entry, the model card re-rendered).

Loss. KL(teacher ‖ student) summed over the vocabulary and averaged over every position of every window, at
temperature 1 (optionally plus ``lm_weight`` × the next-token cross-entropy). The teacher's whole distribution
carries far more signal per token than the one observed next token (the pruned model already predicts text
almost as well as the source; what it lost is the shape of the distribution), it needs no labels, so it works
on text sampled from the teacher itself, and its minimum is the teacher: the student is pulled back towards the
model it was cut from rather than towards the calibration text, which matters when that text is small (the
embedded one is about 80k tokens). The forward direction KL(p_teacher ‖ q_student) is the cross-entropy against
soft labels, mass-covering, the usual choice for distillation from a stronger model (Minitron, Hinton et al.).
A hidden-state term would tie the student to the teacher's internal representation layer by layer; it is not
used: the pruned layers' outputs are meant to differ (their heads are gone) and only the output matters.

Memory. The teacher runs per batch beside the student, under ``torch.no_grad`` in eval mode; its logits exist
for one batch at a time, and both models' logits only for ``losses.POSITIONS_PER_CHUNK`` positions at a time (the loss
goes through the output heads in checkpointed chunks, so a 248k vocabulary costs no [B, T, V] tensor with
autograd history). A teacher too big to sit beside the student is run first instead (``teacher_top_k``): its
top-k log-probabilities (float16) and token ids (int32) at every position of every training window are cached to
disk, 6·k bytes per token (k = 64: 384 bytes per token, 384 MB per million training positions), the teacher is
freed, then the student trains on the cache with the KL between the two distributions coarse-grained to the
teacher's k tokens plus one bin for the rest of the vocabulary (a lower bound of the full KL).

CUDA. fla 0.6's backward kernels fail on Hopper with triton 3.6, so the student's training forward and backward
run inside :func:`compressor.recurrences.torch_recurrences`, which sends the recurrences of ``compressor.modeling`` (gated delta rule,
delta rule, GLA, KDA) to their PyTorch chunked forms, which autograd differentiates. Inference (teacher, sampling,
evaluation) keeps fla's kernels.
"""

from .run import heal_folder
from .settings import HealSettings

__all__ = ["HealSettings", "heal_folder"]
