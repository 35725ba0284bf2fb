"""Run one case: build every provider and the floor, check each against naive, measure memory, time.

Order of work for a case (all in one process, one set of inputs):
1. build the floor and every provider; an ``Unavailable`` provider becomes a "skipped" row with the reason;
2. call each once: this is the first warm-up and the correctness check - loss and student gradients are
   compared with the naive provider's (max |err| / max |naive|), so a fast wrong kernel cannot go unseen
   (with the first provider that ran when naive itself cannot: column "checked_against");
3. peak memory above the inputs, one call per provider (measure.peak_memory_bytes);
4. timing: ``warmup`` more calls each (default 0: steps 2 and 3 already called every provider twice,
   which compiles what torch.compile/Liger compile and faults in every buffer), then ``repeats`` rounds interleaved across providers
   (measure.time_interleaved); the medians and their ratio to the floor's median go into the rows.
"""
from __future__ import annotations

import gc
from typing import Callable, Dict, List, Optional

import torch

from . import measure
from .cases import Case, clear_grads, grad_leaves, make_inputs
from .floor import build_floor, floor_flops
from .providers import Unavailable, providers_for

FLOOR = "floor"
MiB = float(1 << 20)


def _mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimated_naive_bytes(case: Case) -> int:
    """Rough peak of the materializing providers: a handful of fp32 N x V tensors live at once."""
    live = {"linear_divergence": 10, "logits_divergence": 8}.get(case.op, 6)
    return live * case.N * case.V * 4


def _step(fn: Callable[[], torch.Tensor], inputs: Dict[str, torch.Tensor], mode: str):
    """One full call as a user pays for it: forward, and in "fwd+bwd" the backward of the scalar."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn()
        return run

    def run():
        clear_grads(inputs)
        out = fn()
        loss = out if out.dim() == 0 else out.sum()
        loss.backward()
        return loss.detach()
    return run


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| in at least fp32 (inf/nan when x is not finite where ref is).

    Not float64: at GPU-sized cases the gradient of a 151936 x 4096 lm_head would need 5 GB as float64.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, ref.dtype), torch.float32)
    x, ref = x.detach().to(dtype), ref.detach().to(dtype)
    if x.shape != ref.shape:
        x = x.reshape(ref.shape) if x.numel() == ref.numel() else x.sum().expand(ref.shape)
    scale = ref.abs().max().clamp_min(1e-30)
    return float(((x - ref).abs().max() / scale))


def _outputs(step, inputs, mode):
    """Run ``step`` once and keep what the correctness check compares: the output and the gradients."""
    out = step()
    grads = [t.grad.detach().clone() for _, t in grad_leaves(inputs)] if mode == "fwd+bwd" else []
    return out.detach().clone(), grads


def run_case(case: Case, *, providers: Optional[List[str]] = None, repeats: int = 5, warmup: int = 0,
             seed: int = 0, floor_budget_bytes: int = 0, log: Callable[[str], None] = lambda s: None
             ) -> List[dict]:
    """Measure ``case`` on every provider (filtered by ``providers`` name prefixes). Returns CSV rows."""
    device = case.torch_device
    if device.type == "cpu":
        measure.pin_malloc_threshold()
    inputs = make_inputs(case, seed=seed)
    rows: List[dict] = []
    steps: Dict[str, Callable] = {}
    notes: Dict[str, str] = {}

    def base_row(name: str) -> dict:
        return {"case": case.name, "sweep": case.sweep, "op": case.op,
                "divergence": case.divergence + ("+token_weights" if case.token_weights else ""),
                "mode": case.mode, "provider": name, "device": case.device, "dtype": case.dtype,
                "N": case.N, "H": case.H or "", "H_t": case.teacher_hidden if case.op == "linear_divergence" else "",
                "V": case.V, "k": case.k or "", "flops": floor_flops(case)}

    steps[FLOOR] = build_floor(case, inputs, floor_budget_bytes)
    for _ in range(2):  # the floor's two warm-up calls (the providers get theirs in steps 2 and 3)
        steps[FLOOR]()
    avail = _mem_available_bytes() if device.type == "cpu" else None
    unchecked = {p.name for p in providers_for(case, providers) if not p.checked}
    for p in providers_for(case, providers):
        try:
            if p.materializes and avail is not None and estimated_naive_bytes(case) > 0.7 * avail:
                raise Unavailable(f"needs ~{estimated_naive_bytes(case) / 2**30:.1f} GiB, "
                                  f"{avail / 2**30:.1f} GiB available")
            steps[p.name] = _step(p.build(case, inputs), inputs, case.mode)
        except Unavailable as exc:
            notes[p.name] = f"skipped: {exc}"
        except Exception as exc:  # a provider that breaks while building is reported, not fatal
            notes[p.name] = f"error: {type(exc).__name__}: {exc}"

    # 2. first call + correctness against naive (naive runs first; only its outputs are kept). When naive
    #    cannot run (out of memory at GPU-sized cases), the first provider that did run is the reference
    #    and the rows say so in "checked_against".
    ref, ref_name = None, ""
    errors: Dict[str, tuple] = {}
    for name in [n for n in steps if n != FLOOR]:
        log(f"  {name}: first call")
        try:
            out, grads = _outputs(steps[name], inputs, case.mode)
        except Exception as exc:
            del steps[name]
            notes[name] = "OOM" if measure.is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:300]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if name in unchecked:
            notes[name] = "timing reference (computes another quantity on purpose): not checked"
        elif ref is None:
            ref, ref_name = (out, grads), name
        if ref is not None and name not in unchecked:
            gerr = max((_rel_err(g, r) for g, r in zip(grads, ref[1])), default=float("nan"))
            errors[name] = (_rel_err(out, ref[0]), gerr)
        del out, grads
    del ref
    clear_grads(inputs)

    # 3. memory, one provider at a time
    peaks: Dict[str, Optional[int]] = {}
    for name, step in steps.items():
        if name == FLOOR:
            continue
        log(f"  {name}: memory")
        clear_grads(inputs)
        peaks[name] = measure.peak_memory_bytes(step, device)
    clear_grads(inputs)

    # 4. timing, interleaved
    log(f"  timing {len(steps)} callables x {repeats} rounds")
    timings = measure.time_interleaved(steps, device, repeats=repeats, warmup=warmup)
    floor_t = timings[FLOOR].median
    naive_t = timings["naive"].median if "naive" in timings else None
    naive_m = peaks.get("naive")

    for name in [FLOOR] + [p.name for p in providers_for(case, providers)]:
        row = base_row(name)
        if name in timings:
            t = timings[name]
            mem = peaks.get(name)
            row.update(median_s=t.median, min_s=t.minimum, iqr_s=t.iqr, runs=len(t.samples),
                       peak_mem_mb=(mem / MiB) if mem is not None else "",
                       ratio_to_floor=t.median / floor_t, floor_s=floor_t,
                       paired_ratio_to_floor=t.paired_ratio(timings[FLOOR]),
                       samples_s=";".join(f"{x:.6g}" for x in t.samples),
                       speedup_vs_naive=(naive_t / t.median) if naive_t else "",
                       mem_vs_naive=(mem / naive_m) if (mem is not None and naive_m) else "",
                       loss_rel_err=errors.get(name, ("", ""))[0], grad_rel_err=errors.get(name, ("", ""))[1],
                       checked_against=ref_name if name in errors else "",
                       note=notes.get(name, "") if name in unchecked else "GEMM floor: output buffers preallocated, memory not measured" if name == FLOOR
                       and case.op != "logits_divergence" else
                       ("memory floor: one elementwise pass, preallocated output" if name == FLOOR else ""))
            if case.mode == "fwd" and name != FLOOR:
                row["grad_rel_err"] = ""
        else:
            row.update(note=notes.get(name, "not run"))
        rows.append(row)

    del steps, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
