"""Distillation losses: KL(teacher ‖ student) against a live teacher or its cached top-k, through the output
heads a chunk of positions at a time."""

from __future__ import annotations

POSITIONS_PER_CHUNK = 1024
"""Positions whose full-vocabulary logits exist at once in the loss (per model)."""


def _kl_chunk(student_hidden, head, teacher_hidden, teacher_head, targets, lm_weight):
    """Sums over one chunk of positions: (KL(teacher ‖ student), cross-entropy) in float32."""
    import torch
    import torch.nn.functional as F

    student = F.log_softmax(head(student_hidden).float(), dim=-1)
    with torch.no_grad():
        teacher = F.log_softmax(teacher_head(teacher_hidden).float(), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum()
    ce = F.nll_loss(student, targets, ignore_index=-100, reduction="sum") if lm_weight else student.new_zeros(())
    return kl, ce


def _topk_kl_chunk(student_hidden, head, top_logprobs, top_ids, targets, lm_weight):
    """Sums over one chunk: (KL between teacher and student coarse-grained to the teacher's top k + the rest,
    cross-entropy)."""
    import torch
    import torch.nn.functional as F

    student = F.log_softmax(head(student_hidden).float(), dim=-1)
    teacher_top = top_logprobs.float()
    student_top = student.gather(-1, top_ids.long())
    teacher_rest = torch.log1p(-teacher_top.exp().sum(-1).clamp(max=1 - 1e-6))
    student_rest = torch.log1p(-student_top.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (teacher_top.exp() * (teacher_top - student_top)).sum() + (teacher_rest.exp() * (teacher_rest - student_rest)).sum()
    ce = F.nll_loss(student, targets, ignore_index=-100, reduction="sum") if lm_weight else student.new_zeros(())
    return kl, ce


def _targets(ids):
    """Next-token targets [B·T]; the last position of each window has none (-100)."""
    import torch

    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return targets.flatten()


def distillation_loss(student, ids, teacher=None, cached=None, lm_weight: float = 0.0, grad: bool = True):
    """(KL per position, cross-entropy per predicted token) of ``student`` on ``ids`` [B, T] against the live
    ``teacher`` or the ``cached`` (top log-probs [B, T, k], ids [B, T, k]); hidden states go through the output
    heads ``POSITIONS_PER_CHUNK`` positions at a time, each chunk checkpointed when ``grad``."""
    import torch
    from torch.utils.checkpoint import checkpoint

    hidden = student.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state.flatten(0, 1)
    head = student.get_output_embeddings()
    targets = _targets(ids)
    chunks = hidden.split(POSITIONS_PER_CHUNK)
    target_chunks = targets.split(POSITIONS_PER_CHUNK)
    if cached is None:
        with torch.no_grad():
            teacher_hidden = teacher.get_decoder()(input_ids=ids.to(teacher.device), use_cache=False).last_hidden_state
        teacher_chunks = teacher_hidden.flatten(0, 1).to(hidden.device).split(POSITIONS_PER_CHUNK)
        teacher_head = teacher.get_output_embeddings()
        extra = [(chunk,) for chunk in teacher_chunks]
        function = lambda h, t, y: _kl_chunk(h, head, t, teacher_head, y, lm_weight)  # noqa: E731
    else:
        top_logprobs, top_ids = (x.to(hidden.device).flatten(0, 1) for x in cached)
        extra = list(zip(top_logprobs.split(POSITIONS_PER_CHUNK), top_ids.split(POSITIONS_PER_CHUNK)))
        function = lambda h, p, i, y: _topk_kl_chunk(h, head, p, i, y, lm_weight)  # noqa: E731
    kl_total, ce_total = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
    for chunk, more, target in zip(chunks, extra, target_chunks):
        if grad and len(chunks) > 1:
            kl, ce = checkpoint(function, chunk, *more, target, use_reentrant=False)
        else:
            kl, ce = function(chunk, *more, target)
        kl_total, ce_total = kl_total + kl, ce_total + ce
    predicted = max(int((targets != -100).sum()), 1)
    return kl_total / hidden.shape[0], ce_total / predicted


def held_out_kl(student, windows, teacher=None, cached=None, batch_size: int = 8) -> dict:
    """Mean KL(teacher ‖ student) per position and the student's next-token loss on held-out ``windows``."""
    import torch

    was_training = student.training
    student.eval()
    kl_sum, ce_sum, positions, predicted = 0.0, 0.0, 0, 0
    device = next(student.parameters()).device
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            part = None if cached is None else tuple(x[start : start + batch_size] for x in cached)
            kl, ce = distillation_loss(student, ids, teacher, part, lm_weight=1.0, grad=False)
            kl_sum += kl.item() * ids.numel()
            ce_sum += ce.item() * ids[:, 1:].numel()
            positions += ids.numel()
            predicted += ids[:, 1:].numel()
    student.train(was_training)
    return {"kl": kl_sum / positions, "loss": ce_sum / predicted}
