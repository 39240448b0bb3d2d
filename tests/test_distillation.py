"""common.distill's loss against its definition: α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-α)·CE."""

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
