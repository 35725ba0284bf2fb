"""opd-distill step time and peak memory: a LoRA student (--lora-r) against full fine-tuning, on the CPU.

    python benchmarks/trainer_lora.py [--steps 7] [--loss sampled]

Each mode runs in its own process (peak RSS is per process): a random-init Llama student (hidden 256,
4 layers, vocabulary 8192) and teacher (hidden 384), batch 4, 16-id prompts, 32 sampled tokens, one
thread. Step time: the median of the steps after the first. Memory: the process's peak RSS minus its RSS
after the models are built (the training step's own memory: gradients, optimizer state, activations,
the parameter guard's copy).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

STUDENT = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4, vocab_size=8192, max_position_embeddings=256)
TEACHER = dict(STUDENT, hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=6)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(mode: str, steps: int, loss: str) -> dict:
    import torch
    from opd_kernels.trainer import OPDTrainer, TrainConfig
    from opd_kernels.trainer.models import load_model

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    paths = []
    for name, values in (("student", STUDENT), ("teacher", TEACHER)):
        paths.append(os.path.join(tmp, f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(values, f)
    cpu = torch.device("cpu")
    student, teacher = load_model(paths[0], device=cpu, seed=0), load_model(paths[1], device=cpu, seed=1)
    prompts = torch.randint(3, 8192, (16, 16), generator=torch.Generator().manual_seed(0)).tolist()
    cfg = TrainConfig(output_dir=os.path.join(tmp, "run"), steps=steps, batch_size=4, max_new_tokens=32, lr=1e-4,
                      loss=loss, save_every=0, progress=False, verify_lm_head=False, device="cpu",
                      lora_r=16 if mode == "lora" else 0)
    trainer = OPDTrainer(cfg, student, teacher, prompts)
    base = rss_mb()
    times = [trainer.train_step()["seconds"] for _ in range(steps)]
    return {"mode": mode, "loss": loss, "median_step_s": statistics.median(times[1:]),
            "step_memory_mb": rss_mb() - base, "peak_rss_mb": rss_mb(),
            "trainable": sum(p.numel() for p in trainer._trainable())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--loss", default="sampled")
    parser.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one(args.mode, args.steps, args.loss)))
        return
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--loss",
                              args.loss], check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['mode']:>4} {r['loss']}: median step {r['median_step_s'] * 1000:.0f} ms, step memory "
              f"{r['step_memory_mb']:.0f} MB (peak RSS {r['peak_rss_mb']:.0f} MB), {r['trainable']:,} trainable")


if __name__ == "__main__":
    main()
