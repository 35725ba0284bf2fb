"""--vocab-size smaller than the student's lm_head (a teacher with fewer rows): only shared ids are sampled."""
import math

import torch
from trainer_helpers import PROMPTS, one_thread  # noqa: F401 (one_thread: autouse)

from opd_kernels.hf.tiny import tiny_causal_lm
from opd_kernels.trainer import HFSampler, OPDTrainer, TrainConfig


def uniform_student(seed):
    """A 131-row student whose every next-token distribution is uniform (lm_head all zeros): unrestricted,
    about a quarter of its draws would be ids >= 100."""
    student = tiny_causal_lm("llama", seed=seed)
    with torch.no_grad():
        student.lm_head.weight.zero_()
    return student


def test_hf_sampler_draws_below_vocab_size_and_reports_the_restricted_logprobs():
    torch.manual_seed(0)
    sampler = HFSampler(uniform_student(0), max_new_tokens=16, pad_token_id=0, eos_token_id=2, vocab_size=100)
    batch = sampler.sample([[3, 4, 5], [6, 7, 8, 9]])
    drawn = batch.input_ids[batch.loss_mask]
    assert drawn.numel() > 8 and int(drawn.max()) < 100
    # Uniform over the 100 allowed ids: every recorded log-prob is log(1/100).
    lp = batch.sampler_logprobs[batch.loss_mask]
    torch.testing.assert_close(lp, torch.full_like(lp, -math.log(100)))


def test_trainer_with_a_smaller_teacher_and_vocab_size_trains(tmp_path):
    seed = int(torch.randint(0, 2**20, ()))
    torch.manual_seed(seed)
    teacher = tiny_causal_lm("llama", seed=seed + 1, hidden_size=48, vocab_size=100).eval()
    cfg = TrainConfig(output_dir=str(tmp_path), steps=3, batch_size=2, max_new_tokens=8, lr=1e-3, save_every=0,
                      progress=False, verify_lm_head=False, vocab_size=100, loss="sampled")
    trainer = OPDTrainer(cfg, uniform_student(seed), teacher, PROMPTS)
    drawn = []
    sample = trainer.sampler.sample

    def recording(prompts):
        batch = sample(prompts)
        drawn.append(batch.input_ids[batch.loss_mask])
        return batch

    trainer.sampler.sample = recording
    summary = trainer.train()
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert int(torch.cat(drawn).max()) < 100
