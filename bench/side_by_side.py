"""safeprobe against PyTorch eager + peft, side by side: the same checkpoint, data and settings.

    python3 bench/side_by_side.py                       # tests/fixtures/tiny-untied, seconds
    python3 bench/side_by_side.py --model DIR           # a real checkpoint (e.g. an imported GGUF)
    python3 bench/side_by_side.py --model DIR > table.md     # the table is Markdown

Needs torch, transformers and peft (pip install torch transformers peft) and a release build of
safeprobe (`cargo build --release --locked -p safeprobe`, or pass --safeprobe PATH).

What it runs, each measurement in a fresh process so that its peak RSS is its own:
  - training steps, LoRA r = 8 (alpha 16, no dropout) on q_proj and v_proj, task batch --batch,
    --batch safety pairs, every sequence --seq-len tokens of which the first quarter is the
    prompt, the probe on the middle ten layers, rho 1e-3, T = 1, beta 0.05:
    SFT, SAP lagged and exact, the harmful direction refreshed every step (k = 1) and every
    4 steps (k = 4). One warm-up step, then whole refresh cycles of at least --iters steps; the
    mean time per step.
    Both sides get the same token ids (`safeprobe bench --train` documents the formula).
    PyTorch computes each pass's gradients only for what that pass needs (torch.autograd.grad):
    the safety pass for the LoRA weights, the perturbed pass for the probe only.
  - greedy generation of --new-tokens tokens after a 16-token prompt, batch 1, no stop token;
    model load time reported separately.
Peak memory is the process's maximum resident set size (wait4's ru_maxrss), on the CPU.

    python3 bench/side_by_side.py --gpu --model DIR     # on a machine with an NVIDIA GPU

--gpu runs safeprobe on wgpu (`--devices wgpu`: Vulkan there) and PyTorch on CUDA, the same
steps and settings; peak memory is then device memory: PyTorch's
torch.cuda.max_memory_allocated, and for safeprobe the largest `nvidia-smi` reading of its
process (sampled every 0.1 s; wgpu has no allocator statistics of its own). Prepared for the
GPU machine; not yet run, since none has been available.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["sft", "lagged-1", "lagged-4", "exact-1", "exact-4"]
LORA_R, LORA_ALPHA, RHO, TEMPERATURE, BETA, LR = 8, 16.0, 1e-3, 1.0, 0.05, 1e-4


def sequence(seed, seq_len, vocab):
    return [(seed * 7919 + i * 104729) % vocab for i in range(seq_len)]


# ---------------------------------------------------------------- PyTorch side (child processes)


def torch_model(model_dir, lora):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # Subnormal floats run ~100x slower on x86 unless flushed: the SAP safety loss's gradient
    # (a sigmoid of a margin of hundreds of nats) reaches them, and without this the PyTorch
    # lagged k = 1 step measured 73-75 s instead of ~27 s from its fourth step on.
    torch.set_flush_denormal(True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not lora:
        return model.eval()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, config).train()


def torch_device(args):
    return "cuda" if args.gpu else "cpu"


def synchronize(args):
    import torch

    if args.gpu:
        torch.cuda.synchronize()


def torch_batch(seeds, seq_len, vocab, device):
    import torch

    ids = torch.tensor([sequence(s, seq_len, vocab) for s in seeds], device=device)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100
    return ids, labels


def response_logprobs(model, batch):
    """Per-row sums of log p(response token), over the positions after the prompt."""
    import torch

    ids, labels = batch
    logits = model(input_ids=ids).logits[:, :-1]
    targets = labels[:, 1:]
    weights = (targets != -100).float()
    logp = torch.log_softmax(logits.float(), -1).gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * weights).sum(1), weights.sum()


def task_loss(model, batch):
    rows, count = response_logprobs(model, batch)
    return -rows.sum() / count


def safety_loss(model, batch):
    import torch

    rows, _ = response_logprobs(model, batch)
    n = rows.shape[0] // 2
    return -torch.nn.functional.logsigmoid((rows[:n] - rows[n:]) / TEMPERATURE).mean()


def reference_update(*args):
    """Step 3 as the trainer's PyTorch reference takes it (make_train_reference.update)."""
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from make_train_reference import update

    update(*args)


def middle_probe(model):
    """The probe on the middle ten decoder layers (safeprobe's default), as the trainer's
    PyTorch reference (tests/fixtures/make_train_reference.py) hooks it."""
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from make_train_reference import Probe

    layers = len(model.base_model.model.model.layers)
    count = min(10, layers)
    start = (layers - count) // 2
    return Probe(model, list(range(start, start + count)), model.config.hidden_size)


def torch_train(args):
    import torch

    device = torch_device(args)
    model = torch_model(args.model, lora=True).to(device)
    vocab = model.config.vocab_size
    task = torch_batch(range(args.batch), args.seq_len, vocab, device)
    safety = torch_batch(range(100, 100 + 2 * args.batch), args.seq_len, vocab, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    variant = args.variant
    schedule, k = (None, 1) if variant == "sft" else (variant.split("-")[0], int(variant.split("-")[1]))
    probe = middle_probe(model) if schedule else None
    if probe:
        probe.vectors = [v.to(device) for v in probe.vectors]
    probe_vars = [torch.zeros_like(v) for v in probe.vectors] if probe else []
    probe_opt = torch.optim.AdamW([v.requires_grad_(True) for v in probe_vars], lr=BETA, weight_decay=0.0) if probe else None
    state = {"step": 0, "delta": None}

    def sft_step():
        optimizer.zero_grad()
        task_loss(model, task).backward()
        optimizer.step()

    def sap_step():
        current = [v.detach().clone() for v in probe_vars] if schedule == "lagged" else [torch.zeros_like(v) for v in probe_vars]
        if state["step"] % k == 0:
            probe.vectors = current
            g = torch.autograd.grad(safety_loss(model, safety), params)
            g_norm = torch.sqrt(sum((x * x).sum() for x in g))
            w_norm = torch.sqrt(sum((p.detach() * p.detach()).sum() for p in params))
            state["delta"] = [x * (RHO * w_norm / (g_norm + 1e-8)) for x in g]
        state["step"] += 1
        v_clean = [v.clone().requires_grad_(True) for v in current]
        probe.vectors = v_clean
        clean = task_loss(model, task)
        wanted = (params + v_clean) if schedule == "lagged" else v_clean
        grads = torch.autograd.grad(clean, wanted)
        grad_w, gv_clean = (grads[: len(params)], grads[len(params) :]) if schedule == "lagged" else (None, grads)
        with torch.no_grad():
            for p, d in zip(params, state["delta"]):
                p.add_(d)
        v_pert = [v.clone().requires_grad_(True) for v in current]
        probe.vectors = v_pert
        g_su = [gp - gc for gp, gc in zip(torch.autograd.grad(task_loss(model, task), v_pert), gv_clean)]
        with torch.no_grad():
            for p, d in zip(params, state["delta"]):
                p.sub_(d)
        if schedule == "exact":
            probe.vectors = [BETA * g for g in g_su]
            grad_w = torch.autograd.grad(task_loss(model, task), params)
        reference_update(optimizer, params, grad_w, probe_opt, probe_vars, g_su)

    step = sap_step if schedule else sft_step
    step()
    iters = -(-max(1, args.iters) // k) * k
    synchronize(args)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(args)
    per_step = (time.perf_counter() - start) / iters
    out = {"variant": variant, "ms_per_step": per_step * 1e3, "steps_timed": iters, "threads": torch.get_num_threads()}
    if args.gpu:
        out["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def torch_generate(args):
    import torch

    device = torch_device(args)
    start = time.perf_counter()
    model = torch_model(args.model, lora=False).to(device)
    synchronize(args)
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    prompt = torch.tensor([[(i * 17) % vocab for i in range(16)]], device=device)
    greedy = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **greedy)
        synchronize(args)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **greedy)
        synchronize(args)
        seconds = time.perf_counter() - start
    new = out.shape[1] - prompt.shape[1]
    result = {"load_s": load_s, "generate_tokens_per_s": new / seconds, "new_tokens": new}
    if args.gpu:
        result["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


# ---------------------------------------------------------------- the driver


def gpu_memory_of(pid):
    """The GPU memory `nvidia-smi` reports for process `pid` (MiB), or None."""
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=5,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in listing.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return float(fields[1])
    return None


def run_measured(command, gpu=False):
    """Runs a command; returns (its last stdout line as JSON, its peak memory in MiB): the peak
    RSS on the CPU; with gpu, what the command reports itself (device_peak_mib) or else the
    largest nvidia-smi reading of its process."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampled = []
    if gpu:
        def sample():
            while proc.poll() is None:
                used = gpu_memory_of(proc.pid)
                if used is not None:
                    sampled.append(used)
                time.sleep(0.1)

        threading.Thread(target=sample, daemon=True).start()
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(map(str, command))}\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if not gpu:
        return result, usage.ru_maxrss / 1024
    reported = (result[0] if isinstance(result, list) else result).get("device_peak_mib")
    return result, reported if reported is not None else (max(sampled) if sampled else float("nan"))


def safeprobe_binary(given):
    if given:
        return Path(given)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    for candidate in [target / "release" / "safeprobe", Path.home() / ".cargo" / "bin" / "safeprobe"]:
        if candidate.exists():
            return candidate
    sys.exit("no safeprobe binary: build it (cargo build --release --locked -p safeprobe) or pass --safeprobe PATH")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="compare", choices=["compare", "torch-train", "torch-generate"])
    parser.add_argument("--model", default=str(ROOT / "tests/fixtures/tiny-untied"))
    parser.add_argument("--safeprobe")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant")
    parser.add_argument("--gpu", action="store_true", help="safeprobe on wgpu, PyTorch on CUDA")
    args = parser.parse_args()
    if args.mode == "torch-train":
        return torch_train(args)
    if args.mode == "torch-generate":
        return torch_generate(args)

    binary = safeprobe_binary(args.safeprobe)
    shape = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--iters", str(args.iters)]
    me = [sys.executable, __file__, "--model", args.model] + shape + (["--gpu"] if args.gpu else [])
    devices = "wgpu" if args.gpu else "cpu"
    rows = []
    for variant in args.variants.split(","):
        ours, our_rss = run_measured(
            [binary, "bench", "--train", "--model", args.model, "--devices", devices, "--json", "--variants", variant] + shape, args.gpu
        )
        theirs, their_rss = run_measured(me + ["torch-train", "--variant", variant], args.gpu)
        rows.append((variant, ours[0]["ms_per_step"] / 1e3, theirs["ms_per_step"] / 1e3, our_rss, their_rss))
        print(f"{variant}: safeprobe {rows[-1][1]:.2f} s ({our_rss:.0f} MiB), PyTorch {rows[-1][2]:.2f} s ({their_rss:.0f} MiB)", file=sys.stderr)
    gen_ours, gen_our_rss = run_measured(
        [binary, "bench", "--model", args.model, "--devices", devices, "--json", "--batch", "1", "--seq-len", "16", "--new-tokens", str(args.new_tokens), "--iters", "1"],
        args.gpu,
    )
    gen_theirs, gen_their_rss = run_measured(me + ["torch-generate", "--new-tokens", str(args.new_tokens)], args.gpu)
    report(args, rows, (gen_ours[0], gen_our_rss), (gen_theirs, gen_their_rss))


def report(args, rows, gen_ours, gen_theirs):
    import platform

    import torch

    sft = {r[0]: r for r in rows}.get("sft")
    if args.gpu:
        backends = f"safeprobe wgpu vs PyTorch {torch.__version__} CUDA eager + peft on {torch.cuda.get_device_name()}"
        memory = "device memory"
    else:
        backends = f"safeprobe CPU backend (burn flex) vs PyTorch {torch.__version__} eager + peft, {torch.get_num_threads()} threads"
        memory = "RSS"
    lines = [
        f"Model {args.model}; {platform.machine()}, {os.cpu_count()} cores; {backends}; "
        f"task batch {args.batch}, {args.batch} safety pairs, {args.seq_len} tokens per sequence.",
        "",
        f"| step | safeprobe s/step | PyTorch s/step | safeprobe / PyTorch | safeprobe peak {memory} | PyTorch peak {memory} | SAP/SFT safeprobe | SAP/SFT PyTorch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, ours, theirs, our_rss, their_rss in rows:
        name = "SFT" if variant == "sft" else f"SAP {variant.split('-')[0]} k = {variant.split('-')[1]}"
        ratios = f"{ours / sft[1]:.2f}× | {theirs / sft[2]:.2f}×" if sft and variant != "sft" else "— | —"
        lines.append(f"| {name} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f}× | {our_rss:.0f} MiB | {their_rss:.0f} MiB | {ratios} |")
    (ours, our_rss), (theirs, their_rss) = gen_ours, gen_theirs
    lines += [
        "",
        f"| greedy generation, {args.new_tokens} new tokens | safeprobe | PyTorch |",
        "|---|---|---|",
        f"| tokens/s | {ours['generate_tokens_per_s']:.1f} | {theirs['generate_tokens_per_s']:.1f} |",
        f"| model load | {ours['load_s']:.2f} s | {theirs['load_s']:.2f} s |",
        f"| peak {memory} | {our_rss:.0f} MiB | {their_rss:.0f} MiB |",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
