"""Data-parallel trainer on 2 CPU processes (gloo, 127.0.0.1): identical ranks, global normalizer, resume on 1.

Each test spawns 2 workers that join the group the way torchrun's environment tells them to
(``data_parallel.init_from_env``), train tiny config-built Llamas for 2 steps with a deterministic sampler
(completion length depends on the prompt, so the ranks hold different token counts and a per-rank
normalizer would give a different gradient), and save their gradients and weights. The parent then runs
the same prompts on one process (batch 2x as large) and compares. nccl / GPU runs are not tested here.
"""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from opd_kernels.hf.tiny import tiny_causal_lm
from opd_kernels.trainer import FunctionSampler, OPDTrainer, TrainConfig

from gloo import free_port, leave_without_teardown  # noqa: E402  (tests/ is on sys.path under pytest)

FP32_TOL = 5e-5
PROMPTS = [[3 + i, 10 + 2 * i, 40 + i] for i in range(16)]


def engine(prompts):
    """Stand-in sampling engine: a deterministic completion of 1-4 tokens chosen by the prompt."""
    return [([(7 * p[0] + 3 * j) % 120 + 3 for j in range(1 + (p[0] * 5 + p[1]) % 4)], None) for p in prompts]


def make_trainer(out_dir, *, steps, batch_size, seed, fsdp=False, resume=False, sgd=None):
    """Trainer on tiny Llamas; SGD for DDP / one process (weights then move by exactly -lr * grad),
    the default AdamW for FSDP (its optimizer must be built over the shards). Records every step's
    full gradients and per-rank token count."""
    student = tiny_causal_lm("llama", seed=seed)
    teacher = tiny_causal_lm("llama", seed=seed + 1, hidden_size=48).eval()
    cfg = TrainConfig(output_dir=str(out_dir), steps=steps, batch_size=batch_size, grad_accum=2, lr=0.5,
                      max_grad_norm=0, save_every=0, progress=False, fsdp=fsdp, resume=resume, seed=seed,
                      verify_lm_head=False)
    grads, local_tokens = [], []

    def record(trainer, rec):
        grads.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                      for n, p in trainer.student.named_parameters()})

    class CountingSampler(FunctionSampler):
        def sample(self, prompts):
            batch = super().sample(prompts)
            local_tokens.append(int(batch.num_tokens()))
            return batch

    sgd = not fsdp if sgd is None else sgd
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr) if sgd else None
    trainer = OPDTrainer(cfg, student, teacher, PROMPTS, sampler=CountingSampler(engine), optimizer=optimizer,
                         callbacks=[record])
    return trainer, grads, local_tokens


def _worker(rank, world, port, out_dir, result, seed, fsdp):
    from opd_kernels.trainer import data_parallel as dp

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    assert dp.init_from_env("cpu")  # what the CLI does under torchrun
    try:
        trainer, grads, local_tokens = make_trainer(out_dir, steps=2, batch_size=2, seed=seed, fsdp=fsdp)
        summary = trainer.train()
        weights = dp.full_weights(trainer.student)
        losses = [r for r in open(os.path.join(out_dir, "metrics.jsonl"))] if rank == 0 else None
        torch.save({"weights": weights, "grads": grads, "local_tokens": local_tokens, "summary": summary,
                    "mode": trainer.mode, "metrics": losses}, f"{result}.{rank}")
    finally:
        torch.distributed.destroy_process_group()
    leave_without_teardown()


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_two_ranks(tmp_path, seed, fsdp):
    out, result = tmp_path / "two", str(tmp_path / "result")
    mp.spawn(_worker, args=(2, free_port(), str(out), result, seed, fsdp), nprocs=2, join=True)
    return out, [torch.load(f"{result}.{r}", weights_only=False) for r in range(2)]


def weights_of(trainer):
    return {n: p.detach().clone() for n, p in trainer.student.state_dict().items()}


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one_and_resume_on_one(tmp_path, fsdp):
    seed = int(torch.randint(0, 2**20, ()))
    out, ranks = run_two_ranks(tmp_path, seed, fsdp)
    assert [r["mode"] for r in ranks] == (["fsdp"] * 2 if fsdp else ["ddp"] * 2)
    # The ranks drew different prompts with different completion-token counts (so the normalizer matters)...
    assert ranks[0]["local_tokens"] != ranks[1]["local_tokens"]
    # ...and end with identical weights.
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][name]), name

    # One process, the same prompts (batch 4 = 2 ranks x 2) and completions: the same loss and gradient.
    single, grads, _ = make_trainer(tmp_path / "one", steps=3, batch_size=4, seed=seed)
    single.train()
    two = [json.loads(line) for line in ranks[0]["metrics"]]
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one[:2]]
    assert sum(ranks[0]["local_tokens"][:2]) + sum(ranks[1]["local_tokens"][:2]) == one[0]["tokens"]
    assert abs(two[0]["loss"] - one[0]["loss"]) <= FP32_TOL * abs(one[0]["loss"])
    for name, g in grads[0].items():  # step 1: same weights in, so the gradients must agree
        for rank in ranks:
            assert rel_err(rank["grads"][0][name], g) < FP32_TOL, (name, rel_err(rank["grads"][0][name], g))
    if not fsdp:  # SGD: after 2 steps the weights differ only by rounding
        for name, g in grads[1].items():
            assert rel_err(ranks[0]["grads"][1][name], g) < 1e-4, name

    # Resume the 2-process checkpoint (step 2) on one process for step 3.
    resumed, resumed_grads, _ = make_trainer(out, steps=3, batch_size=4, seed=seed, resume=True, sgd=not fsdp)
    assert resumed.step == 2 and resumed.total_tokens == ranks[0]["summary"]["total_tokens"]
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(resumed.student.state_dict()[name], w), name
    summary = resumed.train()
    assert summary["steps"] == 3 and summary["checkpoint"].endswith("step_00000003")
    assert len(resumed_grads) == 1
    if not fsdp:  # same optimizer (SGD) on both sides: step 3 of the resumed run is step 3 of the straight one
        ref, got = weights_of(single), weights_of(resumed)
        for name in ref:
            assert rel_err(got[name], ref[name]) < 1e-4, name
    else:  # the AdamW state saved from FSDP shards was restored whole (step count 2, then one more step)
        steps = {float(s["step"]) for s in resumed.optimizer.state_dict()["state"].values()}
        assert steps == {3.0}


def test_torchrun_launches_the_cli_on_two_processes(tmp_path):
    """The documented launch line, run for real: torchrun, 2 CPU processes, gloo on 127.0.0.1."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "opd_kernels.trainer.cli", "--student", "tiny:llama",
           "--teacher", "tiny:llama", "--prompts", "random:8:3", "--steps", "2", "--batch-size", "2",
           "--max-new-tokens", "3", "--save-every", "1", "--output-dir", str(out), "--no-progress",
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("opd-distill: 2 steps") == 1  # rank 0 reports, rank 1 stays quiet
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    # 2 ranks x 2 prompts x at most 3 new tokens; the tiny models have no EOS, so every completion is full.
    assert [r["tokens"] for r in records] == [12, 12]
    state = json.load(open(out / "checkpoints" / "step_00000002" / "state.json"))
    assert state["world_size"] == 2 and state["total_tokens"] == 24
    assert len(torch.load(out / "checkpoints" / "step_00000002" / "rng.pt", weights_only=False)["ranks"]) == 2
