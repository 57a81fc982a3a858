"""Speed on one GPU: attention alone, the loss alone, and whole training steps of the default model.

    python bench.py                                  # the attention, loss and step tables
    python bench.py --tables attention --seq-lens 8192
    python bench.py --tables step --seq-lens 1024 --profile gated    # plus one step's GPU time by kernel kind
    python bench.py --tables loss,step --seq-lens 1024 --presets fa4:gated --loss plain,fp8   # the FP8 output layer

Every variant runs in this one process, after a warm-up, and reports the median of many timed runs
(CUDA events). Attention: forward + backward in bf16 of the default model's query and key/value heads (ModelConfig),
with batch x length fixed at --tokens. Loss: forward + backward of the tied output layer and cross-entropy on
--tokens tokens. Steps: one compiled forward + backward + AdamW step of the default model on --tokens tokens, as
train_gpt.py runs it (its make_optimizer), on each attention backend (--backends; fa4 rows need flash-attn-4) and with
each loss (--loss).
"""
import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import train_gpt as tg

DEFAULT = tg.ModelConfig()  # the model every table measures
N_HEAD, N_KV_HEAD, HEAD_DIM, D_MODEL = DEFAULT.n_head, DEFAULT.n_kv_head, DEFAULT.head_dim, DEFAULT.d_model
WINDOW = 256  # the paper's window (study.py's gated arm)
GPT2_VOCAB = tg.BOS_ID + 1  # the ids of real text, which the random inputs are drawn from


def median_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def window_rule(window: int):
    return tg.sliding_window_mask(tg.ModelConfig(window=window))


def attention_variants(T: int, backends, device):
    """name -> function of (q, k, v, x) returning the attention output (B, H, T, D)."""
    untuned_flex = torch.compile(flex_attention, dynamic=False)
    window_block_mask = create_block_mask(window_rule(WINDOW), None, None, T, T, device=device)
    gate = torch.nn.Linear(D_MODEL, N_HEAD, device=device, dtype=torch.bfloat16)

    def sdpa_flash(q, k, v, x):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def ours(backend, window, gated=False):
        mask = tg.build_mask(window_rule(window), T, device, backend)
        if not gated:
            return lambda q, k, v, x: tg.attention(q, k, v, mask)
        return lambda q, k, v, x: tg.attention(q, k, v, mask) * torch.sigmoid(gate(x)).transpose(1, 2).unsqueeze(-1)

    variants = {"SDPA flash, causal": sdpa_flash}
    for backend in backends:
        variants[f"{backend}, causal (baseline)"] = ours(backend, 0)
        variants[f"{backend}, window {WINDOW}"] = ours(backend, WINDOW)
        variants[f"{backend}, window {WINDOW} + gate"] = ours(backend, WINDOW, gated=True)
    variants[f"untuned flex, window {WINDOW}"] = lambda q, k, v, x: untuned_flex(q, k, v, block_mask=window_block_mask,
                                                                                enable_gqa=True)
    variants[f"flex FLASH backend, window {WINDOW}"] = lambda q, k, v, x: untuned_flex(
        q, k, v, block_mask=window_block_mask, enable_gqa=True, kernel_options={"BACKEND": "FLASH"})
    return variants


def attention_table(seq_lens, tokens: int, backends, device):
    rows = []
    for T in seq_lens:
        B = tokens // T
        # (B, H, T, D) views of (B, T, H, D) tensors, as Attention.qkv makes them
        make = lambda h: torch.randn(B, T, h, HEAD_DIM, device=device, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        q, k, v = make(N_HEAD), make(N_KV_HEAD), make(N_KV_HEAD)
        x = torch.randn(B, T, D_MODEL, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(B, N_HEAD, T, HEAD_DIM, device=device, dtype=torch.bfloat16)
        times = {}
        for name, fn in attention_variants(T, backends, device).items():
            def step():
                fn(q, k, v, x).backward(grad)
                q.grad = k.grad = v.grad = x.grad = None
            try:
                times[name] = median_ms(step, warmup=5, reps=30)
            except Exception as error:  # a backend that refuses a shape is a row, not a crash
                times[name] = None
                print(f"T={T} {name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        reference = times["SDPA flash, causal"]
        for name, ms in times.items():
            ratio = f"{ms / reference:.2f}" if ms and reference else "-"
            rows.append(f"| {T} | {name} | {ms:.3f} | {ratio} |" if ms else f"| {T} | {name} | error | - |")
    print(f"\nAttention forward + backward, bf16, {N_HEAD} query heads / {N_KV_HEAD} KV heads of {HEAD_DIM}, "
          f"{tokens:,} tokens (batch x length)")
    print("| seq len | variant | ms (median) | vs SDPA flash causal |\n|---|---|---|---|")
    print("\n".join(rows))


SAFE = {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}
FLEX_CONFIGS = {  # (block-mask block size, kernel_options) tried by --tables sweep for the window kernel
    "default": (128, None),
    "fwd M128 N128 w8 s2": (128, {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2}),
    "safe rows, contiguous blocks": (128, SAFE),
    "+ prescaled QK": (128, {**SAFE, "PRESCALE_QK": True}),
    "+ TMA": (128, {**SAFE, "USE_TMA": True}),
    "+ dQ in the dK loop": (128, {**SAFE, "WRITE_DQ": False}),
    "bwd M1 64 N1 128 M2 128 N2 64 w8 s2": (128, {**SAFE, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                                  "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 2}),
    "bwd M1 32 N1 128 M2 128 N2 32 w4 s3": (128, {**SAFE, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                                  "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 3}),
}


def flex_sweep(seq_lens, tokens: int, device):
    """Window-256 flex_attention, forward + backward, over block sizes and kernel options."""
    compiled = torch.compile(flex_attention, dynamic=False)
    print(f"\nflex_attention window {WINDOW}, forward + backward, {tokens:,} tokens")
    print("| seq len | configuration | ms (median) | output error vs SDPA + dense mask |\n|---|---|---|---|")
    for T in seq_lens:
        B = tokens // T
        make = lambda h: torch.randn(B, h, T, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
        q, k, v = make(N_HEAD), make(N_KV_HEAD), make(N_KV_HEAD)
        grad = torch.randn_like(q)
        with torch.no_grad():  # a fast configuration is only worth having if it computes the same thing
            dense = tg.build_mask(window_rule(WINDOW), T, device, "sdpa")
            reference = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float(), attn_mask=dense,
                                                       enable_gqa=True)
        for name, (block, options) in FLEX_CONFIGS.items():
            mask = create_block_mask(window_rule(WINDOW), None, None, T, T, device=device, BLOCK_SIZE=block)

            def step():
                compiled(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options).backward(grad)
                q.grad = k.grad = v.grad = None
            try:
                ms = median_ms(step, warmup=5, reps=30)
                with torch.no_grad():
                    out = compiled(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options)[:1].float()
                error = ((out - reference).norm() / reference.norm()).item()
                print(f"| {T} | {name} | {ms:.3f} | {error:.1e} |", flush=True)
            except Exception as error:
                print(f"| {T} | {name} | error: {type(error).__name__}: {str(error).splitlines()[0][:120]} | |")


def loss_variants():
    """name -> function of (x, weight, targets) returning the mean cross-entropy of x @ weight^T."""
    def plain(x, weight, targets):
        return F.cross_entropy(F.linear(x, weight).float(), targets)

    def fp8(x, weight, targets):
        return F.cross_entropy(tg.fp8_linear(x, weight).float(), targets)

    variants = {"plain (logits, then cross-entropy), compiled": torch.compile(plain)}
    if torch.cuda.get_device_capability() >= (8, 9):
        variants["FP8 output layer, then cross-entropy (--loss fp8), compiled"] = torch.compile(fp8)
    if tg.liger_loss_module() is None:
        print("liger-kernel: not installed")
    else:
        variants["liger-kernel fused linear cross-entropy"] = lambda x, weight, targets: tg.liger_loss_module()(
            weight, x, targets)
    return variants


def loss_table(tokens: int, device):
    """The output layer and the loss on the final hidden states, as GPT.forward computes them under autocast."""
    x = torch.randn(tokens, D_MODEL, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(DEFAULT.vocab_size, D_MODEL, device=device)).requires_grad_()
    targets = torch.randint(0, GPT2_VOCAB, (tokens,), device=device)
    rows, reference = [], None
    for name, fn in loss_variants().items():
        def step():
            with tg.autocast(device):
                loss = fn(x.to(torch.bfloat16) if "liger" in name else x,
                          weight.to(torch.bfloat16) if "liger" in name else weight, targets)
            loss.backward()
            return loss
        try:
            torch.cuda.reset_peak_memory_stats(device)
            loss = step()
            grads = (x.grad.float().clone(), weight.grad.float().clone())
            x.grad = weight.grad = None
            ms = median_ms(lambda: (step(), setattr(x, "grad", None), setattr(weight, "grad", None)), 3, 15)
            memory = torch.cuda.max_memory_allocated(device) / 1e9
        except Exception as error:
            print(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            continue
        if reference is None:
            reference = (loss.item(), grads)
        errors = [((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference[1])]
        rows.append(f"| {name} | {ms:.2f} | {memory:.1f} | {loss.item() - reference[0]:+.1e} | "
                    f"{errors[0]:.1e} / {errors[1]:.1e} |")
    print(f"\nOutput layer + cross-entropy, forward + backward, {tokens:,} tokens x {DEFAULT.vocab_size:,} classes")
    print("| variant | ms (median) | peak memory (GB) | loss - plain | gradient error vs plain (x / weight) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


STEP_VARIANTS = {"baseline": dict(window=0, gate="none"), "gated": dict(window=WINDOW, gate="head"),
                 "window": dict(window=WINDOW, gate="none")}


def build_step(args: tg.Hyperparameters, backend: str, device):
    """One training step as train_gpt.py's loop runs it (with its --loss), with one micro-step."""
    cfg = tg.ModelConfig.from_args(args)
    raw_model = tg.GPT(cfg, tg.check_loss(args.loss, device, cfg, args.micro_batch_tokens)).to(device)
    model = torch.compile(raw_model, dynamic=False)
    optimizer = tg.make_optimizer(raw_model, args)
    masks = raw_model.masks(args.seq_len, device, backend)
    B = args.micro_batch_tokens // args.seq_len
    inputs, targets = torch.randint(0, GPT2_VOCAB, (2, B, args.seq_len), device=device)

    def step():
        with tg.autocast(device):
            loss = model(inputs, targets, masks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, tg.training_flops_per_token(raw_model.cfg, sum(p.numel() for p in raw_model.parameters()))


def step_table(seq_lens, tokens: int, backends, presets, losses, peak_tflops: float, profile: str, device):
    rows = []
    for T, backend, name, loss in itertools.product(seq_lens, backends, presets, losses):
        if ":" in name:  # BACKEND:PRESET, a row for that backend only
            if not name.startswith(backend + ":"):
                continue
            name = name.split(":")[1]
        args = tg.Hyperparameters(seq_len=T, micro_batch_tokens=tokens, loss=loss, **STEP_VARIANTS[name])
        step, flops = build_step(args, backend, device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        ms = median_ms(step, warmup=3, reps=15)
        tokens_per_s = tokens / (ms / 1000)
        mfu = flops * tokens_per_s / (peak_tflops * 1e12)
        memory = torch.cuda.max_memory_allocated(device) / 1e9
        rows.append(f"| {T} | {backend} | {name} | {loss} | {ms:.1f} | {tokens_per_s:,.0f} | {100 * mfu:.1f}% | "
                    f"{memory:.1f} |")
        print(f"T={T} {backend} {name} {loss}: {ms:.1f} ms/step (first step, compiling, {compile_s:.0f} s)",
              flush=True)
        if f"{backend}:{name}" == profile:
            print_profile(step)
        del step
        torch.cuda.empty_cache()
    print(f"\nTraining step of the default model (compiled, AdamW), {tokens:,} tokens per step, "
          f"MFU over {peak_tflops:.0f} TFLOP/s")
    print("| seq len | attention | preset | loss | ms/step | tokens/s | MFU | peak memory (GB) |\n"
          "|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def kernel_kind(name: str) -> str:
    """The part of a step a CUDA kernel belongs to, from its name."""
    name = name.lower()
    if "flex" in name or "flash" in name:  # FlexAttention's Triton kernels; FlashAttention-4's CuTe ones
        return "attention"
    if "cross_entropy" in name:  # liger-kernel's fused loss (inductor's own loss kernels are named by their ops)
        return "loss"
    # triton_tem: inductor's other Triton templates are matrix products (under mode="max-autotune")
    if any(s in name for s in ("gemm", "cutlass", "nvjet", "xmma", "cublas")) or name.startswith("triton_tem"):
        return "matrix products"
    if "adam" in name or "multi_tensor" in name:
        return "optimizer"
    if name.startswith("triton_"):
        return "elementwise and reductions"
    return "other"


def print_profile(step):
    """GPU time of one step by kernel kind, then the top kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    by_kind = {}
    for e in kernels:
        by_kind[kernel_kind(e.key)] = by_kind.get(kernel_kind(e.key), 0) + e.device_time_total / 1000
    print(f"GPU time {sum(by_kind.values()):.1f} ms: "
          + ", ".join(f"{kind} {ms:.1f}" for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    for e in kernels[:40]:
        print(f"{e.device_time_total / 1000:8.2f} ms {e.count:4d}x  {kernel_kind(e.key):26s} {e.key[:100]}")


def main():
    torch._dynamo.config.recompile_limit = 64  # one compiled flex_attention serves every shape and option here
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="attention,loss,step",
                        help="attention, loss, step, sweep (flex options for the window kernel), comma-separated")
    parser.add_argument("--seq-lens", default=None, help="comma-separated; default 1024..16384 for attention, "
                                                         "1024,4096,8192,16384 for steps")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per call (batch x sequence length)")
    parser.add_argument("--backends", default="flex,fa4", help="attention backends to time, comma-separated")
    parser.add_argument("--loss", default=tg.Hyperparameters.loss, help="the step table's losses, comma-separated "
                                                                        "(train_gpt.py's --loss: plain, fused, fp8)")
    parser.add_argument("--presets", default="baseline,window,gated",
                        help="step table rows, comma-separated: PRESET (every backend) or BACKEND:PRESET")
    parser.add_argument("--peak-tflops", type=float, default=tg.Hyperparameters.peak_tflops)
    parser.add_argument("--profile", default="",
                        help="BACKEND:PRESET (e.g. fa4:gated): print one step's GPU time by kernel kind, and its "
                             "top kernels")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.py needs a CUDA GPU")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    backends = args.backends.split(",")
    for backend in backends:  # a backend that cannot run here stops the benchmark before any timing
        tg.choose_attention_backend(backend, tg.ModelConfig(), device)
    seq_lens = [int(s) for s in args.seq_lens.split(",")] if args.seq_lens else None
    if "attention" in args.tables:
        attention_table(seq_lens or [1024, 2048, 4096, 8192, 16384], args.tokens, backends, device)
    if "sweep" in args.tables:
        flex_sweep(seq_lens or [8192], args.tokens, device)
    if "loss" in args.tables:
        loss_table(args.tokens, device)
    if "step" in args.tables:
        step_table(seq_lens or [1024, 4096, 8192, 16384], args.tokens, backends, args.presets.split(","),
                   args.loss.split(","), args.peak_tflops, args.profile, device)


if __name__ == "__main__":
    main()
