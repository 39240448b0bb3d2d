"""common.distill's loss against its definition: α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-α)·CE."""

import pytest
import torch
import torch.nn.functional as F

from common.distill import distillation_loss


def test_matches_the_definition_written_out():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    y = torch.randint(0, 11, (3, 5))
    T, a = 3.0, 0.7
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean()
    ce = F.cross_entropy(s.reshape(-1, 11), y.reshape(-1))
    torch.testing.assert_close(distillation_loss(s, t, y, T, a), a * T**2 * kl + (1 - a) * ce)


def test_a_student_equal_to_its_teacher_pays_only_the_hard_term():
    s = torch.randn(4, 7)
    y = torch.randint(0, 7, (4,))
    torch.testing.assert_close(distillation_loss(s, s.clone(), y, 2.0, 0.5), 0.5 * F.cross_entropy(s, y))


def test_unlabelled_positions_count_in_the_soft_term_only():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    y = torch.tensor([1, -100, 3, -100])
    soft_only = distillation_loss(s, t, y, 2.0, 1.0)
    full = distillation_loss(s, t, y, 2.0, 0.5)
    ce = F.cross_entropy(s[[0, 2]], y[[0, 2]])
    torch.testing.assert_close(full, 0.5 * soft_only + 0.5 * ce)


def _student_run(tmp_path, steps, interrupt_at=None, resume=False):
    """A small LM student trained by distillation for ``steps``; KeyboardInterrupt after ``interrupt_at``."""
    from common.distill import lm_logits, train_student
    from common.models.decoder import DecoderConfig, DecoderLM

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=32, context_length=8, n_layer=1, d_model=16, n_head=2, n_kv_head=2)
    teacher, student = DecoderLM(config).eval(), DecoderLM(config)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randint(0, 32, (4, 8), generator=g), torch.randint(0, 32, (4, 8), generator=g))
        for _ in range(6)
    ]

    def batches():
        for i, b in enumerate(data[:steps]):
            if i == interrupt_at:
                raise KeyboardInterrupt
            yield b

    losses = train_student(
        student, teacher, batches, steps, 1e-2, 2.0, 0.5, lm_logits, ckpt_dir=tmp_path / "ckpt", resume=resume
    )
    return student, losses


def test_a_stopped_student_resumes_to_the_weights_of_an_unbroken_run(tmp_path):
    from common.distill import check_student_checkpoint
    from common.errors import UsageError

    unbroken, unbroken_losses = _student_run(tmp_path / "a", 6)
    with pytest.raises(KeyboardInterrupt) as e:
        _student_run(tmp_path / "b", 6, interrupt_at=3)
    assert e.value.step == 3 and e.value.checkpoint_dir == tmp_path / "b" / "ckpt"
    resumed, losses = _student_run(tmp_path / "b", 6, resume=True)
    assert losses == unbroken_losses
    for a, b in zip(unbroken.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert _student_run(tmp_path / "b", 6, resume=True)[1] == losses  # finished: nothing more trains
    with pytest.raises(UsageError, match="trained with steps=6, this run asks for steps=5"):
        check_student_checkpoint(tmp_path / "b" / "ckpt", {"steps": 5})


def test_the_distillation_script_resumes_both_students_and_refuses_nothing_saved(tmp_path):
    from ch07_deployment import s7_4_3_knowledge_distillation as s743
    from common.errors import UsageError

    flags = ["--task", "lm", "--model", "test", "--steps", "3", "--eval-batches", "1", "--out", str(tmp_path)]
    with pytest.raises(UsageError, match="no student checkpoint"):
        s743.main([*flags, "--resume"])
    first = s743.main(flags)
    again = s743.main([*flags, "--resume"])  # both finished: kept, the same students
    assert again["distilled_val_loss"] == first["distilled_val_loss"]
    with pytest.raises(UsageError, match="trained with lr="):
        s743.main([*flags, "--resume", "--lr", "0.5"])
    with pytest.raises(SystemExit):
        s743.main(["--quick", "--resume", "--out", str(tmp_path / "d")])  # digits: no checkpoints
