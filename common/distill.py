"""Knowledge distillation (Hinton et al., 2015): a student learns from a teacher's softened outputs
(chapter 7.4.3's section, and the distilled variants of 7.4.4's comparison).

The student's loss mixes the teacher's softened distribution with the usual cross-entropy::

    loss = α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 - α) · CE(s, y)

where ``t`` and ``s`` are the teacher's and the student's logits; the ``T²`` keeps the soft term's
gradients the size of the hard term's as ``T`` grows.  :func:`distillation_loss` is that formula,
:func:`train_student` the loop (AdamW, linear decay; by cross-entropy alone when there is no teacher,
the control), :func:`student_config` a smaller decoder on the teacher's tokenizer and
:func:`lm_batches` the training batches, the same for every student that is given the same seed::

    config = student_config(data, n_layer=2, d_model=64)
    student = DecoderLM(config)
    train_student(student, teacher, lm_batches(data, 300, 16, seed=1), 300, 3e-3, 2.0, 0.5, lm_logits)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 - α) · CE(s, y)``, averaged over positions.

    Logits are (..., classes), targets (...) class ids, -100 where a position has no label."""
    s = student_logits.reshape(-1, student_logits.shape[-1]).float()  # (positions, classes)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    soft = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    hard = F.cross_entropy(s, targets.reshape(-1), ignore_index=-100)  # -100: no label, soft term only
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def student_settings(student, teacher, steps, lr, temperature, alpha, dtype) -> dict:
    """What a student's checkpoint must agree with to be continued: the run's settings and the model."""
    from common.training import model_config

    return {
        "steps": steps,
        "lr": lr,
        "temperature": temperature,
        "alpha": alpha,
        "dtype": dtype,
        "teacher": teacher is not None,
        "model_config": model_config(student),
    }


def check_student_checkpoint(ckpt_dir, settings: dict) -> int | None:
    """The step of the student checkpoint in ``ckpt_dir`` (None: there is none), after checking that it
    was trained with ``settings``; :class:`~common.errors.UsageError` naming the first that differs."""
    from common import checkpoint as ckpt
    from common.errors import UsageError

    if not ckpt.has_checkpoint(ckpt_dir):
        return None
    state = ckpt.read_state(ckpt_dir)
    saved = (state.get("extra") or {}).get("settings") or {}
    for key, value in settings.items():
        if saved.get(key) != value:
            raise UsageError(
                f"resume: the student in {ckpt_dir} was trained with {key}={saved.get(key)!r}, this run asks "
                f"for {key}={value!r}; keep it, or use another output folder"
            )
    return state["step"]


def train_student(
    student,
    teacher,
    batches,
    steps,
    lr,
    temperature,
    alpha,
    logits_of,
    progress: str | None = None,
    dtype: str = "fp32",
    ckpt_dir=None,
    resume: bool = False,
) -> list[float]:
    """Train ``student`` for ``steps`` on ``batches()`` (x, y); with a teacher, by the distillation loss,
    else by cross-entropy. ``logits_of(model, x)`` gives a model's logits, computed under autocast to
    ``dtype`` (the losses in fp32). ``progress``: a progress bar with that title
    (:func:`common.progress.progress`). Returns the loss per step.

    With ``ckpt_dir``, Ctrl-C or SIGTERM saves a checkpoint (:mod:`common.checkpoint`: weights,
    optimizer, schedule, losses) and the finished run saves its last; ``resume=True`` continues from it
    (after :func:`check_student_checkpoint`), skipping the batches already trained on, so the run ends
    where an unbroken one would; a finished checkpoint trains nothing more."""
    from common import checkpoint as ckpt
    from common.training import autocast_for

    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    settings = student_settings(student, teacher, steps, lr, temperature, alpha, dtype)
    losses, start = [], 0
    if resume and check_student_checkpoint(ckpt_dir, settings) is not None:
        state = ckpt.load_checkpoint(ckpt_dir, student, opt)
        sched.load_state_dict(state["extra"]["scheduler"])
        losses, start = list(state["extra"]["losses"]), state["step"]

    def save() -> None:
        extra = {"settings": settings, "losses": losses, "scheduler": sched.state_dict()}
        ckpt.save_checkpoint(ckpt_dir, student, opt, len(losses), extra=extra)

    student.train()
    bar = None
    if progress:
        from common.progress import progress as progress_bar

        bar = progress_bar(total=steps, initial=start, desc=progress)
    try:
        for i, (x, y) in enumerate(batches()):
            if i < start:  # trained on before the checkpoint: the same batches, in the same order
                continue
            with autocast_for(x.device.type, dtype):
                s = logits_of(student, x).float()
                if teacher is not None:
                    with torch.no_grad():
                        t = logits_of(teacher, x).float()
            if teacher is None:
                loss = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
            else:
                loss = distillation_loss(s, t, y, temperature, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    except KeyboardInterrupt as e:
        if ckpt_dir is not None:
            save()
            e.checkpoint_dir, e.step = ckpt_dir, len(losses)
        raise
    finally:
        if bar is not None:
            bar.close()
    if ckpt_dir is not None and len(losses) > start:
        save()
    student.eval()
    return losses


def lm_logits(model, x):
    """A decoder LM's logits (batch, seq, vocab): the model called without targets."""
    return model(x)[0]


def lm_batches(data, steps: int, batch_size: int, seed: int):
    """A function yielding ``steps`` training batches (x, y) of ``data``; each call yields the same ones."""

    def batches():
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            yield data.get_batch("train", batch_size, generator=g)

    return batches


def student_config(data, n_layer: int, d_model: int):
    """A Llama-style decoder config for a student on ``data``'s tokenizer and context: ``n_layer`` layers
    of width ``d_model``, heads of 32 dimensions, untied embeddings, no dropout."""
    from common.models.decoder import DecoderConfig

    if n_layer < 1 or d_model < 1:
        raise ValueError(f"a student needs at least one layer and width, got {n_layer} x {d_model}")
    return DecoderConfig(
        vocab_size=data.vocab_size,
        context_length=data.context_length,
        n_layer=n_layer,
        d_model=d_model,
        n_head=max(1, d_model // 32),
        n_kv_head=max(1, d_model // 32),
        tie_embeddings=False,
        dropout=0.0,
    )
