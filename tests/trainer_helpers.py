"""Small trainers on tiny config-built models, shared by the trainer test files (no downloads)."""
import pytest
import torch

from opd_kernels.hf.tiny import tiny_causal_lm
from opd_kernels.trainer import OPDTrainer, TrainConfig

PROMPTS = [[3 + i, 4 + i, 5 + i] for i in range(7)]


def make(out_dir, steps, seed, callbacks=(), tokenizer=None, prompts=PROMPTS, **overrides):
    """A 2-prompt-batch trainer: tiny Llama student (H=32) and teacher (H=48), a checkpoint every 2 steps."""
    torch.manual_seed(seed)
    student = tiny_causal_lm("llama", seed=seed)
    teacher = tiny_causal_lm("llama", seed=seed + 1, hidden_size=48).eval()
    values = dict(output_dir=str(out_dir), steps=steps, batch_size=2, max_new_tokens=4, lr=1e-3, save_every=2,
                  progress=False, verify_lm_head=False)
    values.update(overrides)
    return OPDTrainer(TrainConfig(**values), student, teacher, prompts, callbacks=callbacks, tokenizer=tokenizer,
                      teacher_tokenizer=tokenizer)


def snapshot(trainer):
    return {n: p.detach().clone() for n, p in trainer.student.named_parameters()}


def seed_from_test():
    """A seed drawn from the test's RNG (seeded per run by conftest: fresh inputs, replayable)."""
    return int(torch.randint(0, 2**20, ()))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a loaded shared machine 2 threads made a 4-step
    run 20x slower (13 s vs 0.6 s). Imported by each trainer test module, autouse there."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
