"""Section 7.4.3: knowledge distillation: a smaller student learns from the trained LM's soft targets.

The student's loss mixes the teacher's softened distribution with the usual next-token cross-entropy
(Hinton et al., 2015)::

    loss = α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 - α) · CE(s, y)

where ``t`` and ``s`` are the teacher's and the student's logits; the ``T²`` keeps the soft term's
gradients the size of the hard term's as ``T`` grows.  The control is the same student (same
initial weights, same batches, same optimizer, same number of steps) trained on the cross-entropy alone.
The loss and the training loop are in ``common/distill.py`` (:func:`common.distill.distillation_loss`,
:func:`common.distill.train_student`).

Default: the teacher is the project's trained LM (``--model tiny``, or ``--hf-path DIR``) and the
student a decoder with fewer and narrower layers on the same tokenizer; the figures are both
students' validation loss and bits per byte, and the teacher's.  ``--quick`` distils on scikit-learn's
bundled handwritten digits (real data, no download): an MLP teacher trained on all training images, a
much narrower MLP student that has labels for 100 of them; the distilled student also learns from the
teacher's soft targets on the unlabelled rest (a transfer set, as in Hinton et al.), the control only
from the 100 labels.  In both, ``distilled_val_loss`` should end below ``scratch_val_loss``.

    python -m ch07_deployment.s7_4_3_knowledge_distillation
    python -m ch07_deployment.s7_4_3_knowledge_distillation --resume   # after Ctrl-C or SIGTERM
    python -m ch07_deployment.s7_4_3_knowledge_distillation --quick

The LM students save a checkpoint each (``--out``/checkpoint-scratch, checkpoint-distilled) when
stopped and when done; ``--resume`` continues them with the same settings, starts one that never began
and refuses other settings before either trains.  The digits students train in seconds and keep none.
"""

from __future__ import annotations

import copy
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from common.distill import (
    check_student_checkpoint,
    lm_batches,
    lm_logits,
    student_config,
    student_settings,
    train_student,
)
from common.errors import UsageError
from common.lm_source import add_source_args, evaluate_lm, load_source
from common.runner import (
    add_dtype_flag,
    checks_done,
    int_between,
    parse_args,
    positive_float,
    positive_int,
    run_script,
    script_parser,
    unit_float,
    width_int,
)


def run_lm(args, source) -> dict:
    from common.models.decoder import DecoderLM

    teacher = source.model.eval()
    data = source.data
    tc = getattr(teacher, "config", None)
    try:
        config = student_config(data, args.student_layers, args.student_width)
    except ValueError as e:
        raise UsageError(str(e)) from None
    torch.manual_seed(args.seed)
    student0 = DecoderLM(config)

    def evaluate(m):
        return evaluate_lm(m, data, batch_size=16, max_batches=args.eval_batches)

    runs = {"scratch": None, "distilled": teacher}
    folders = {name: os.path.join(args.out, f"checkpoint-{name}") for name in runs}
    if args.resume:  # both students checked before either trains
        saved = {
            name: check_student_checkpoint(
                folders[name],
                student_settings(student0, t, args.steps, args.lr, args.temperature, args.alpha, args.dtype),
            )
            for name, t in runs.items()
        }
        if all(step is None for step in saved.values()):
            raise UsageError(f"resume: no student checkpoint in {args.out} to resume from")
        where = {n: "starts" if st is None else f"from step {st}" for n, st in saved.items()}
        print("resume: " + ", ".join(f"{n} student {w}" for n, w in where.items()))
    checks_done(args)
    batches = lm_batches(data, args.steps, args.batch_size, args.seed + 1)  # the same for both students
    results = {}
    for name, t in runs.items():
        student = copy.deepcopy(student0)
        start = time.perf_counter()
        losses = train_student(
            student,
            t,
            batches,
            args.steps,
            args.lr,
            args.temperature,
            args.alpha,
            lm_logits,
            f"{name} student",
            dtype=args.dtype,
            ckpt_dir=folders[name],
            resume=args.resume,
        )
        results[name] = {**evaluate(student), "seconds": time.perf_counter() - start, "last_loss": losses[-1]}
    teacher_eval = evaluate(teacher)
    t_params = sum(p.numel() for p in teacher.parameters())
    s_params = student0.num_params()
    print(
        f"teacher: {source.describe()}"
        + (f", {tc.n_layer} layers x {tc.d_model}" if tc is not None else "")
        + f"\nstudent: {s_params:,} parameters ({s_params / t_params:.2f}x), "
        f"{config.n_layer} layers x {config.d_model}; "
        f"{args.steps} steps of {args.batch_size} x {data.context_length} tokens, T={args.temperature}, "
        f"alpha={args.alpha}"
    )
    print(f"\n{'':10} {'val loss':>9} {'ppl':>8} {'bpb':>7} {'train s':>8}")
    print(f"{'teacher':10} {teacher_eval['loss']:9.4f} {teacher_eval['ppl']:8.2f} {teacher_eval['bpb']:7.4f}")
    for name, r in results.items():
        print(f"{name:10} {r['loss']:9.4f} {r['ppl']:8.2f} {r['bpb']:7.4f} {r['seconds']:8.1f}")
    return {
        "task": "lm",
        "teacher": source.name,
        "teacher_params": t_params,
        "student_params": s_params,
        "teacher_val_loss": teacher_eval["loss"],
        "scratch_val_loss": results["scratch"]["loss"],
        "distilled_val_loss": results["distilled"]["loss"],
        "scratch_val_bpb": results["scratch"]["bpb"],
        "distilled_val_bpb": results["distilled"]["bpb"],
        "scratch_seconds": results["scratch"]["seconds"],
        "distilled_seconds": results["distilled"]["seconds"],
    }


def mlp(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def run_digits(args) -> dict:
    """Distillation on scikit-learn's 8x8 digits: teacher MLP (256 hidden) -> student MLP (8 hidden)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.3, random_state=args.seed, stratify=digits.target
    )
    x_train, x_val = (torch.tensor(a, dtype=torch.float32) for a in (x_train, x_val))
    y_train, y_val = (torch.tensor(a, dtype=torch.long) for a in (y_train, y_val))
    labelled = 100  # the student's labelled images; the distilled one also sees the rest, unlabelled

    def batches(x, y, steps):  # full batches
        return lambda: ((x, y) for _ in range(steps))

    def plain(model, x):
        return model(x)

    unlabelled = y_train.clone()
    unlabelled[labelled:] = -100
    student_data = {
        "scratch": (x_train[:labelled], y_train[:labelled]),
        "distilled": (x_train, unlabelled),  # the teacher's soft targets on every training image
    }
    torch.manual_seed(args.seed)
    teacher = mlp(64, 256)
    train_student(teacher, None, batches(x_train, y_train, 200), 200, 1e-2, 1.0, 0.0, plain)
    torch.manual_seed(args.seed + 1)
    student0 = mlp(64, 8)
    results = {}
    for name, t in (("scratch", None), ("distilled", teacher)):
        student = copy.deepcopy(student0)
        train_student(
            student,
            t,
            batches(*student_data[name], args.steps),
            args.steps,
            1e-2,
            args.temperature,
            args.alpha,
            plain,
            dtype=args.dtype,
        )
        with torch.no_grad():
            logits = student(x_val)
        results[name] = {
            "loss": F.cross_entropy(logits, y_val).item(),
            "acc": (logits.argmax(-1) == y_val).float().mean().item(),
        }
    with torch.no_grad():
        t_logits = teacher(x_val)
    t_loss, t_acc = (
        F.cross_entropy(t_logits, y_val).item(),
        (t_logits.argmax(-1) == y_val).float().mean().item(),
    )
    print(
        f"digits (scikit-learn, 8x8, {len(x_train)} train / {len(x_val)} val): teacher MLP 64-256-10 on all "
        f"training images; student MLP 64-8-10 with {labelled} of them labelled, {args.steps} steps, "
        f"T={args.temperature}, "
        f"alpha={args.alpha}; the scratch student trains on the labelled images, the distilled one also on "
        f"the teacher's soft targets for the {len(x_train) - labelled} unlabelled ones (a transfer set)"
    )
    print(f"\n{'':10} {'val loss':>9} {'accuracy':>9}")
    print(f"{'teacher':10} {t_loss:9.4f} {t_acc:9.3f}")
    for name, r in results.items():
        print(f"{name:10} {r['loss']:9.4f} {r['acc']:9.3f}")
    return {
        "task": "digits",
        "teacher_val_loss": t_loss,
        "teacher_val_acc": t_acc,
        "scratch_val_loss": results["scratch"]["loss"],
        "distilled_val_loss": results["distilled"]["loss"],
        "scratch_val_acc": results["scratch"]["acc"],
        "distilled_val_acc": results["distilled"]["acc"],
    }


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    add_source_args(parser)
    parser.add_argument("--task", choices=["lm", "digits"], default=None, help="default lm (quick: digits)")
    parser.add_argument(
        "--steps",
        type=int_between(1, 100_000),  # the LM task draws every step's batch before training
        default=300,
        help="training steps of each student",
    )
    parser.add_argument("--batch-size", type=int_between(1, 4096), default=16, help="sequences per step (LM)")
    parser.add_argument(
        "--lr", type=positive_float, default=3e-3, help="AdamW learning rate, linear decay to 0 (LM)"
    )
    parser.add_argument(
        "--temperature", type=positive_float, default=None, help="softmax temperature T (2; digits 4)"
    )
    parser.add_argument(
        "--alpha", type=unit_float, default=None, help="weight of the soft term (0.5; digits 0.9)"
    )
    parser.add_argument("--student-layers", type=int_between(1, 1024), default=2, help="student depth (LM)")
    parser.add_argument("--student-width", type=width_int, default=64, help="student d_model (LM)")
    parser.add_argument(
        "--eval-batches", type=positive_int, default=None, help="validation batches of 16 (all)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="LM task: continue the students from their checkpoints in --out (one that never began starts)",
    )
    args = parse_args(parser, argv)
    args.task = args.task or ("digits" if args.quick else "lm")
    if args.temperature is None:
        args.temperature = 4.0 if args.task == "digits" else 2.0
    if args.alpha is None:
        args.alpha = 0.9 if args.task == "digits" else 0.5
    if args.task == "digits":
        if args.resume:
            parser.error(
                "--resume is for --task lm (the digits students train in seconds, without checkpoints)"
            )
        if args.model or args.hf_path:
            parser.error(
                "--model and --hf-path choose the teacher of --task lm (quick mode's task is digits)"
            )
        checks_done(args)
        figures = run_digits(args)
    else:
        figures = run_lm(args, load_source(parser, args))
    gain = figures["scratch_val_loss"] - figures["distilled_val_loss"]
    verdict = "lower" if gain > 0 else "NOT lower"
    print(f"\nthe distilled student ends {verdict} than the one trained from scratch by {gain:.4f} nats")
    figures["distillation_gain"] = gain
    return figures


if __name__ == "__main__":
    run_script(main)
