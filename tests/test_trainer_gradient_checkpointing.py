"""--gradient-checkpointing: the student's decoder layers recompute in the backward, with equal losses and
gradients."""
import pytest
import torch

from opd_kernels.trainer import TrainConfig

from trainer_helpers import make, one_thread  # noqa: F401  (one_thread: autouse fixture)


def loss_and_grads(tmp_path, checkpointing, loss):
    trainer = make(tmp_path / f"run_{checkpointing}_{loss}", steps=1, seed=11, loss=loss,
                   gradient_checkpointing=checkpointing)
    torch.manual_seed(3)
    batch, _ = trainer._sample(0)  # the batch and each row's teacher name
    saved = []  # elements autograd keeps for the backward (a checkpointed layer keeps only its inputs)

    def pack(t):
        saved.append(t.numel())
        return t

    trainer.student.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = trainer.loss_module(trainer.teacher, batch, trainer.cfg, None)
    value.backward()
    grads = {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}
    return value.detach(), grads, sum(saved)


@pytest.mark.parametrize("loss", ["reverse_kl", "sampled", "topk"])
def test_equal_losses_and_gradients_with_the_layers_recomputed(tmp_path, loss):
    plain_loss, plain_grads, plain_saved = loss_and_grads(tmp_path, False, loss)
    ckpt_loss, ckpt_grads, ckpt_saved = loss_and_grads(tmp_path, True, loss)
    assert ckpt_saved < 0.6 * plain_saved, (ckpt_saved, plain_saved)  # the layers' activations are not kept
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-6, atol=1e-8, msg=name)


def test_a_whole_run_with_checkpointing_and_its_config_key(tmp_path):
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing
    with pytest.raises(ValueError, match="gradient_checkpointing: expected true or false"):
        TrainConfig(gradient_checkpointing="yes")
    summary = make(tmp_path / "run", steps=2, seed=4, gradient_checkpointing=True).train()
    assert summary["steps"] == 2 and summary["final_loss"] is not None
