"""Which changes make train_gpt.py's training step faster (issue 22): each candidate is timed in this one process
as a whole step (forward, backward, gradient clipping, fused AdamW with train_gpt.main's param groups) of 64 x 1024
random tokens, bf16 autocast, plain loss, torch.compile(dynamic=False), from the same weights on the same batch.

    python results/perf/h200-2026-12-03/candidates.py --backend fa4            # one GPU; writes to $OUT, else .
    python results/perf/h200-2026-12-03/candidates.py --device cpu --tiny      # the CPU check: 2 layers, no compile

A variant is MODEL:PARTS[@MODE]. MODEL: gated (window 256, head gate), baseline (full causal, no gate) or window
(window 256, no gate: the gate's cost is gated's time minus window's). PARTS, joined by +: ref (train_gpt's model
as it is), qkvg (q, k, v and the gate's W_g stacked in one weight, one matrix
product split by views), qkvg8 (the same, its width rounded up to a multiple of 8 with zero rows that nothing
reads), qkv (q, k and v stacked, 2,560 rows, the gate its own product), gatepad (the gate's own product padded to a
multiple of 8 rows at call time: 16 for the head gate's 12), mlp (gate_proj and up_proj stacked), ce (the output
layer and cross-entropy as one autograd Function that computes the logits' gradient in the forward pass:
LinearCrossEntropy), qmlp (the MLP through quack-kernels' MLP, whose matrix products compute SwiGLU in their
epilogues, forward and backward; train_gpt's parameters, stacked every step), qce (the output layer and loss
through quack-kernels' chunked linear cross-entropy, which on an H100/H200 computes the softmax in its products'
epilogues and never stores the logits).
qmlp and qce need quack-kernels (in the optional GPU wheels); on the CPU they fall back to train_gpt's MLP and the
plain loss, so the CPU check covers little of them. MODE: torch.compile's mode (default, reduce-overhead,
max-autotune-no-cudagraphs, max-autotune). The residual stream is train_gpt's, bf16 under autocast since 5593f34
(the `bf16` part of the tables before that commit), except with f32: float32 from the embedding on, as before
5593f34, the path issue 22's 1.15x is measured against.

Every variant starts from the reference's weights copied into its layout, so the first step's loss and gradients
must agree with the reference's to rounding (the table's last columns; a layout bug shows as an error near 1). The
head gate's W_g and b_g are drawn at random instead of train_gpt's zeros, so the check also sees the gate's rows;
the speed does not depend on the values. Variants run in the order given; one that would end past --budget-s
seconds after the start is skipped, and one still running then is stopped, so the table always prints. It is
printed last, and written with a JSON of every number to --out after each variant.
"""
import time

START = time.perf_counter()  # the --budget-s clock: the process's own start-up counts against it

import argparse
import dataclasses
import gc
import json
import os
import signal
import statistics
import sys
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO)
import train_gpt as tg  # noqa: E402  (found through REPO, from any working directory)

# window: the gated model without its gate, for the gate's share of a step (issue 22: at most 2%)
MODELS = {"gated": dict(window=256, gate="head"), "baseline": dict(window=0, gate="none"),
          "window": dict(window=256, gate="none")}
PARTS = ("ref", "f32", "qkvg", "qkvg8", "qkv", "gatepad", "mlp", "ce", "qmlp", "qce")
MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
# Most promising first, since the budget cuts the list's end. The first measurement (flex.md, whose header lists its
# variants) ran the fused layouts with and without the bf16 residual, CUDA graphs, each fusion alone and the baseline:
# stacking paid only when its width was a multiple of 8, and the bf16 residual paid. The second (fa4.md) timed each
# alone: the bf16 residual 1.052x (train_gpt's since 5593f34, so in ref now), the aligned stacks and the padded gate
# 1 to 2%. The elementwise work left is largest in the MLP and the loss: now the loss as one Function, quack's fused
# SwiGLU and loss, and all of them with the stack of q, k and v.
DEFAULT_VARIANTS = ("gated:ref", "gated:f32", "gated:qce", "gated:qmlp", "gated:qkv+gatepad+qmlp+qce",
                    "window:qkv+qmlp+qce", "baseline:ref", "baseline:f32", "baseline:qkv+qmlp+qce",
                    "gated:qkvg8+qmlp+qce", "gated:qkv+gatepad+ce")
TINY = dict(vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, mlp_hidden=128, seq_len=64)
TINY_BATCH, TINY_WINDOW = 4, 16
ALIGN = 8  # bf16 elements in 16 bytes: the alignment of row strides that cuBLAS's fast kernels and TMA need


# -----------------------------------------------------------------------------
# Variants


@dataclasses.dataclass(frozen=True)
class Variant:
    spec: str
    model: str
    parts: frozenset
    mode: str


def parse_variant(spec: str) -> Variant:
    model, _, rest = spec.partition(":")
    parts, _, mode = rest.partition("@")
    parts, mode = frozenset(parts.split("+")), mode or "default"
    problems = []
    if model not in MODELS:
        problems.append(f"model {model!r} is not one of {', '.join(MODELS)}")
    if not parts <= set(PARTS):
        problems.append(f"parts {', '.join(sorted(parts - set(PARTS)))} not among {', '.join(PARTS)}")
    if "ref" in parts and len(parts) > 1:
        problems.append("ref means no change, so it stands alone")
    if len(parts & {"qkvg", "qkvg8", "qkv"}) > 1:
        problems.append("qkvg, qkvg8 and qkv are layouts of one projection: pick one")
    if len(parts & {"mlp", "qmlp"}) > 1:
        problems.append("mlp and qmlp are two ways to compute the MLP: pick one")
    if len(parts & {"ce", "qce"}) > 1:
        problems.append("ce and qce are two ways to compute the loss: pick one")
    if "gatepad" in parts and parts & {"qkvg", "qkvg8"}:
        problems.append("gatepad pads the gate's own product, which qkvg and qkvg8 fold into theirs: use qkv")
    if mode not in MODES:
        problems.append(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if problems:
        raise ValueError(f"--variants {spec!r}: " + "; ".join(problems) + " (form MODEL:PART+PART[@MODE])")
    return Variant(spec, model, parts, mode)


class PaddedGate(tg.Gate):
    """train_gpt's Gate, its product padded at call time with zero rows to a multiple of ALIGN outputs (16 for the
    head gate's 12) and sliced back: output rows of 32 bytes, a multiple of 16 as cuBLAS's fast kernels want, not 24.
    The same parameters; the padded outputs' gradients are zero, so the weight's gradient is the reference's."""

    def forward(self, x):
        if self.weight is None:
            return super().forward(x)
        B, T, _ = x.shape
        rows = self.weight.size(0)
        pad = -rows % ALIGN
        bias = None if self.bias is None else F.pad(self.bias, (0, pad))
        logits = F.linear(x, F.pad(self.weight, (0, 0, 0, pad)), bias)[..., :rows]
        return torch.sigmoid(logits).view(B, T, self.n_head, self.width)


class FusedAttention(nn.Module):
    """train_gpt's Attention with q_proj, k_proj, v_proj and (gate_inside) the gate's W_g as one weight, qkvg.weight
    (their rows stacked in that order, then zero rows up to a multiple of `multiple`), and b_g as gate_bias. One matrix
    product, split by views: the gate's n_head columns ride in the big product instead of three skinny ones of their
    own. Without gate_inside the gate stays its own module, `gate` (train_gpt's Gate, or PaddedGate if padded)."""

    def __init__(self, cfg: tg.ModelConfig, multiple: int, gate_inside: bool = True, padded_gate: bool = False):
        super().__init__()
        if cfg.gate not in ("none", "head", "head-nobias", "head-open", "channel"):
            raise ValueError(f"--gate {cfg.gate}: the fused layout has no second attention pass for it")
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.gated, self.gate_width = cfg.gate != "none", cfg.head_dim if cfg.gate == "channel" else 1
        self.gate_inside = self.gated and gate_inside
        self.gate = (PaddedGate if padded_gate else tg.Gate)(cfg) if self.gated and not gate_inside else None
        self.sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
        if self.gate_inside:
            self.sizes.append(cfg.n_head * self.gate_width)
        width = -(-sum(self.sizes) // multiple) * multiple
        if width > sum(self.sizes):
            self.sizes.append(width - sum(self.sizes))  # padding: split off and never read, so its gradient is 0
        self.qkvg = nn.Linear(cfg.d_model, width, bias=False)
        has_bias = self.gate_inside and cfg.gate != "head-nobias"
        self.gate_bias = nn.Parameter(torch.empty(cfg.n_head * self.gate_width)) if has_bias else None
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        # FlashAttention-4 reads v through TMA, which needs 16-byte row strides; v is a view with the fused width's
        # stride, so an unaligned width gets a contiguous copy of v there (set by build_model)
        self.copy_v = False

    def forward(self, x, cos, sin, masks: tg.AttentionMasks):
        B, T, _ = x.shape
        q, k, v, *rest = self.qkvg(x).split(self.sizes, dim=-1)  # views of one (B, T, width) output
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim))
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim))
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if self.copy_v:
            v = v.contiguous()
        q, k = tg.apply_rotary(q, cos, sin), tg.apply_rotary(k, cos, sin)
        y = tg.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), masks.local).transpose(1, 2)
        if self.gate_inside:  # as Gate: the bias added in the product's dtype, then the sigmoid, per head (B, T, H, 1)
            logits = rest[0] if self.gate_bias is None else rest[0] + self.gate_bias.to(rest[0].dtype)
            y = y * torch.sigmoid(logits).view(B, T, self.n_head, self.gate_width)
        elif self.gate is not None:
            y = y * self.gate(x)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))


class FusedMLP(nn.Module):
    """train_gpt's MLP with gate_proj and up_proj as one weight, gate_up.weight (gate_proj's rows first)."""

    def __init__(self, cfg: tg.ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


QUACK = {}  # quack-kernels' functions, imported by load_quack before a qmlp or qce variant is compiled


def load_quack():
    """Imports quack-kernels' MLP and linear cross-entropy once, outside any compiled code: an import error is then
    the variant's error row, and the compiled forward only reads QUACK."""
    if not QUACK:
        from quack.linear_cross_entropy import chunked_linear_cross_entropy
        from quack.mlp import mlp_func
        QUACK.update(mlp_func=mlp_func, chunked_linear_cross_entropy=chunked_linear_cross_entropy)


class QuackMLP(tg.MLP):
    """train_gpt's MLP, its parameters as they are, through quack-kernels' MLP on CUDA: the first product writes
    silu(gate) * up from its epilogue (and the pre-activations, for the backward), the backward's first product
    computes SwiGLU's derivative in its epilogue. Its first weight is gate_proj's rows, then up_proj's
    (concat_layout), stacked every step: 2 x 2048 x 768 values, little next to the activations of 65,536 tokens. On
    the CPU, train_gpt's MLP."""

    def forward(self, x):
        if not x.is_cuda:
            return super().forward(x)
        gate_up = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        # tuned=False: quack's default tiles. Its autotuner would JIT-compile some 40 configurations of each of the
        # MLP's six products, minutes that a candidate's budget does not have; tune once this pays untuned
        return QUACK["mlp_func"](x, gate_up, self.down_proj.weight, activation="swiglu", concat_layout=True,
                                 tuned=False)


def quack_linear_cross_entropy(x, weight, targets):
    """The tied output layer and the mean cross-entropy through quack-kernels' chunked linear cross-entropy (its
    scaled-exp pipeline on an H100/H200: the softmax in the products' epilogues, the gradients computed in the forward
    pass, no (N, V) logits stored). On the CPU, the plain loss."""
    if not x.is_cuda:
        return F.cross_entropy(F.linear(x, weight).float(), targets)
    return QUACK["chunked_linear_cross_entropy"](x, weight, targets)


class LinearCrossEntropy(torch.autograd.Function):
    """The tied output layer and the mean cross-entropy, f(x (N, d), weight (V, d), targets (N,)), with the logits'
    gradient, (softmax - one-hot) / N, computed in the forward pass in the logits' dtype. The compiler can then fuse
    the loss and the gradient into the passes over the logits that the loss makes anyway, and the backward is two
    matrix products: no second reading of the logits for the softmax, and one (N, V) tensor kept instead of the
    logits and what the cross-entropy's backward keeps. The arithmetic of the plain loss: the products in autocast's
    dtype (as F.linear under autocast), the softmax in float32."""

    @staticmethod
    def forward(ctx, x, weight, targets):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_c, weight_c = x.to(dtype), weight.to(dtype)  # autocast does not reach backward, so cast by hand
        logits = (x_c @ weight_c.t()).float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        loss = (lse.squeeze(1) - logits.gather(1, targets[:, None]).squeeze(1)).mean()
        is_target = torch.arange(logits.size(1), device=logits.device) == targets[:, None]
        grad_logits = ((torch.exp(logits - lse) - is_target.float()) / logits.size(0)).to(dtype)
        ctx.save_for_backward(x_c, weight_c, grad_logits)
        ctx.dtypes = x.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x_c, weight_c, grad_logits = ctx.saved_tensors
        grad_logits = grad_logits * grad_loss.to(grad_logits.dtype)
        return (grad_logits @ weight_c).to(ctx.dtypes[0]), (grad_logits.t() @ x_c).to(ctx.dtypes[1]), None


class CandidateGPT(tg.GPT):
    """train_gpt's GPT with the variant's layers swapped in (their weights come from to_layout) and its loss."""

    def __init__(self, cfg: tg.ModelConfig, parts: frozenset):
        super().__init__(cfg)
        self.loss_part = next(iter(parts & {"ce", "qce"}), None)
        for block in self.blocks:
            if parts & {"qkvg", "qkvg8"}:
                block.attn = FusedAttention(cfg, ALIGN if "qkvg8" in parts else 1)
            elif "qkv" in parts:
                block.attn = FusedAttention(cfg, 1, gate_inside=False, padded_gate="gatepad" in parts)
            elif "gatepad" in parts and block.attn.gate is not None:
                block.attn.gate = PaddedGate(cfg)
            if "mlp" in parts:
                block.mlp = FusedMLP(cfg)
            elif "qmlp" in parts:
                block.mlp = QuackMLP(cfg)
        self.float32_residual = "f32" in parts

    def hidden(self, idx, masks):
        if not self.float32_residual:
            return super().hidden(idx, masks)
        T = idx.size(1)  # train_gpt's GPT.hidden before 5593f34: the embedding's float32 kept by each block's add
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, masks)
        return self.final_norm(x)

    def forward(self, idx, targets, masks):
        if self.loss_part is None:
            return super().forward(idx, targets, masks)
        loss = LinearCrossEntropy.apply if self.loss_part == "ce" else quack_linear_cross_entropy
        return loss(self.hidden(idx, masks).flatten(0, 1), self.embed.weight, targets.flatten())


def to_layout(state: dict, model: nn.Module) -> dict:
    """The reference's state dict in `model`'s layout: fused weights are the reference's rows stacked."""
    out = dict(state)
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        if isinstance(block.attn, FusedAttention):
            names = ["q_proj", "k_proj", "v_proj"] + (["gate"] if block.attn.gate_inside else [])
            rows = [out.pop(f"{p}attn.{name}.weight") for name in names]
            padding = block.attn.qkvg.out_features - sum(r.size(0) for r in rows)
            out[p + "attn.qkvg.weight"] = torch.cat(rows + [rows[0].new_zeros(padding, rows[0].size(1))])
            if block.attn.gate_bias is not None:
                out[p + "attn.gate_bias"] = out.pop(p + "attn.gate.bias")
        if isinstance(block.mlp, FusedMLP):
            out[p + "mlp.gate_up.weight"] = torch.cat([out.pop(p + "mlp.gate_proj.weight"),
                                                       out.pop(p + "mlp.up_proj.weight")])
    return out


def to_reference(tensors: dict, model: nn.Module) -> dict:
    """`model`'s parameters (or their gradients), by name, in the reference's layout; padding rows dropped."""
    out = dict(tensors)
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        if isinstance(block.attn, FusedAttention):
            names = ["q_proj", "k_proj", "v_proj"] + (["gate"] if block.attn.gate_inside else [])
            for name, rows in zip(names, out.pop(p + "attn.qkvg.weight").split(block.attn.sizes)):
                out[f"{p}attn.{name}.weight"] = rows
            if block.attn.gate_bias is not None:
                out[p + "attn.gate.bias"] = out.pop(p + "attn.gate_bias")
        if isinstance(block.mlp, FusedMLP):
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = out.pop(p + "mlp.gate_up.weight").chunk(2)
    return out


def reference_state(cfg: tg.ModelConfig, seed: int) -> dict:
    """train_gpt's initial weights (torch.manual_seed, then GPT on the CPU), with the gate drawn at random."""
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.gate is not None:
                block.attn.gate.weight.normal_(0, 0.02, generator=generator)
                if block.attn.gate.bias is not None:
                    block.attn.gate.bias.normal_(0, 1.0, generator=generator)
    return {name: t.clone() for name, t in model.state_dict().items()}


# -----------------------------------------------------------------------------
# One variant: build, check the residual dtype, compile, step, time


class Deadline(BaseException):
    """Raised by SIGALRM at --budget-s. Not an Exception, so that compile code which catches errors (autotuning
    skips a failing choice) lets it through."""


def on_deadline(signum, frame):
    raise Deadline()


def residual_dtypes(model, inputs, masks, autocast) -> str:
    """The residual stream's dtype after the first and the last block, from one eager forward of one sequence
    (dense masks: the dtype does not depend on the attention kernel, and flex would compile for this shape)."""
    seen = []
    hooks = [model.blocks[i].register_forward_hook(lambda m, args, out: seen.append(str(out.dtype).split(".")[-1]))
             for i in (0, len(model.blocks) - 1)]
    try:
        with torch.no_grad(), autocast():
            model.hidden(inputs[:1], masks)
    finally:
        for hook in hooks:
            hook.remove()
    return "/".join(dict.fromkeys(seen))


def gradients(model) -> dict:
    """The gradients, float32 on the CPU, by the reference's parameter names."""
    return to_reference({n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}, model)


def compare(grads: dict, reference: dict) -> tuple[float, str, float]:
    """The largest relative error of one parameter's gradient, its name, and the error of all of them together."""
    worst, worst_name, diff2, ref2 = 0.0, "", 0.0, 0.0
    for name, ref in reference.items():
        d, r = (grads[name] - ref).norm().item(), ref.norm().item()
        diff2, ref2 = diff2 + d * d, ref2 + r * r
        error = d / r if r > 0 else d
        if error >= worst:
            worst, worst_name = error, name
    return worst, worst_name, (diff2 / ref2) ** 0.5 if ref2 > 0 else diff2 ** 0.5


def build_model(variant: Variant, cfg, state, backend, device):
    if device.type == "cuda" and variant.parts & {"qmlp", "qce"}:
        load_quack()
    if variant.parts == {"ref"}:
        model = tg.GPT(cfg)
    else:
        model = CandidateGPT(cfg, variant.parts)
        for block in model.blocks:
            if isinstance(block.attn, FusedAttention):
                block.attn.copy_v = backend == "fa4" and block.attn.qkvg.out_features % ALIGN != 0
    model.load_state_dict(to_layout(state, model))  # strict: every weight of the layout, no more
    return model.to(device)


def measure(variant: Variant, ctx, is_reference: bool, reference) -> dict:
    """Times one variant. The comparison reference of a model records its step-0 loss and gradients, and their
    noise (the same pass run twice); the others are compared with `reference`, that record (None: not run)."""
    args, device, cfg = ctx.args, ctx.device, ctx.cfgs[variant.model]
    result = {"spec": variant.spec}
    model = build_model(variant, cfg, ctx.states[variant.model], ctx.backend, device)
    result["width_qkvg"] = [b.attn.qkvg.out_features for b in model.blocks if isinstance(b.attn, FusedAttention)][:1]
    result["copy_v"] = any(getattr(b.attn, "copy_v", False) for b in model.blocks)
    try:  # a report, not part of the step: its failure should not cost the variant
        result["residual"] = residual_dtypes(model, ctx.inputs, model.masks(cfg.seq_len, device), ctx.autocast)
    except Exception as error:
        result["residual"] = f"unknown ({type(error).__name__})"
    masks = model.masks(cfg.seq_len, device, ctx.backend)
    compiled, cudagraphs = model, False
    if ctx.compile:
        mode = None if variant.mode == "default" else variant.mode
        compiled = torch.compile(model, dynamic=False, mode=mode, backend=args.compile_backend)
        cudagraphs = variant.mode in ("reduce-overhead", "max-autotune")
    elif variant.mode != "default":
        result["note"] = f"mode {variant.mode} not applied: compile is off"
    hp = tg.Hyperparameters()
    params, optimizer = list(model.parameters()), tg.make_optimizer(model, hp)  # train_gpt.main's AdamW and groups

    def forward_backward():
        if cudagraphs:  # a new iteration for CUDA graph trees: the previous step's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with ctx.autocast():
            loss = compiled(ctx.inputs, ctx.targets, masks)
        loss.backward()
        return loss

    def update():
        torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    loss0 = forward_backward().item()  # step 0, with the compilation; read before the update changes anything
    result["first_step_s"] = time.perf_counter() - t0
    grads = gradients(model)
    if is_reference:  # the reference's noise: the same forward and backward again, from the same weights
        optimizer.zero_grad(set_to_none=True)
        again = forward_backward().item()
        worst, name, total = compare(gradients(model), grads)
        result["noise"] = {"loss_diff": again - loss0, "grad_err_max": worst, "grad_err_max_param": name,
                           "grad_err_total": total}
        result["_reference"] = {"loss0": loss0, "grads": grads}
    elif reference is not None:
        worst, name, total = compare(grads, reference["grads"])
        result.update(loss_diff=loss0 - reference["loss0"], grad_err_max=worst, grad_err_max_param=name,
                      grad_err_total=total)
    del grads
    result["loss0"] = loss0
    update()
    for _ in range(args.warmup - 1):
        forward_backward()
        update()
    sync()
    result["warmup_s"] = time.perf_counter() - t0

    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward_backward()
            update()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            forward_backward()
            update()
            times.append(1000 * (time.perf_counter() - t))
    ms = statistics.median(times)
    tokens = ctx.inputs.numel()
    result.update(status="ok", ms=ms, ms_min=min(times), ms_max=max(times), ms_all=times,
                  tokens_per_s=tokens / (ms / 1000))
    if device.type == "cuda":
        result["mfu"] = ctx.flops[variant.model] * result["tokens_per_s"] / (args.peak_tflops * 1e12)
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if variant.spec in ctx.profile:
        import bench  # its kernel-kind breakdown; imported only here, since it is only needed here
        bench.print_profile(lambda: (forward_backward(), update()))
    return result


def free_memory():
    gc.collect()
    torch._dynamo.reset()  # the compiled graphs, and CUDA graph trees with their memory pools
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -----------------------------------------------------------------------------
# Report


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def report(ctx, results: list, skipped: list) -> str:
    refs = {}  # the comparison reference's ms per model
    for r in results:
        if "noise" in r and r.get("status") == "ok":
            refs[parse_variant(r["spec"]).model] = r["ms"]
    on_gpu = ctx.device.type == "cuda"
    lines = [f"{ctx.header}", "",
             "| variant | ms/step (median; min-max) | ref / this | tokens/s | MFU | peak GB | warm-up s | residual | "
             "step-0 loss | loss - ref | grad error vs ref: largest (param), all |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("status") != "ok":
            lines.append(f"| {r['spec']} | {r.get('status')}: {r.get('error', '')[:150]} |||||||||")
            continue
        ref_ms = refs.get(parse_variant(r["spec"]).model)
        if "noise" in r:
            n = r["noise"]
            loss_diff, grad = (f"noise {n['loss_diff']:+.1e}",
                               f"noise {n['grad_err_max']:.1e} ({n['grad_err_max_param']}), {n['grad_err_total']:.1e}")
        else:
            loss_diff = fmt(r.get("loss_diff"), "+.1e")
            grad = (f"{r['grad_err_max']:.1e} ({r['grad_err_max_param']}), {r['grad_err_total']:.1e}"
                    if "grad_err_max" in r else "-")
        lines.append(f"| {r['spec']} | {r['ms']:.1f}; {r['ms_min']:.1f}-{r['ms_max']:.1f} | "
                     f"{fmt(ref_ms and ref_ms / r['ms'], '.3f')} | {r['tokens_per_s']:,.0f} | "
                     f"{fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}{'%' if on_gpu else ''} | "
                     f"{fmt(r.get('peak_mem_gb'), '.1f')} | {r['warmup_s']:.0f} | {r['residual']} | "
                     f"{r['loss0']:.6f} | {loss_diff} | {grad} |")
    notes = [f"{r['spec']}: {r['note']}" for r in results if r.get("note")]
    notes += [f"{r['spec']}: v copied to contiguous for FlashAttention-4 (fused width {r['width_qkvg'][0]} is not "
              f"a multiple of {ALIGN})" for r in results if r.get("copy_v")]
    notes += [f"skipped {s['spec']}: {s['reason']}" for s in skipped]
    lines += [""] + notes if notes else []
    return "\n".join(lines)


def write_outputs(ctx, results, skipped, final: bool):
    """The table and every number, rewritten after each variant, so a run stopped from outside keeps what it had."""
    os.makedirs(ctx.args.out, exist_ok=True)
    text = report(ctx, results, skipped)
    with open(os.path.join(ctx.args.out, "candidates.md"), "w") as f:
        f.write(text + ("\n" if final else "\n\n(unfinished: the run was still going when this was written)\n"))
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    with open(os.path.join(ctx.args.out, "candidates.json"), "w") as f:
        json.dump({"header": ctx.header, "env": ctx.env, "args": vars(ctx.args), "configs": {
            m: dataclasses.asdict(c) for m, c in ctx.cfgs.items()}, "params": ctx.n_params, "flops_per_token":
            ctx.flops, "backend": ctx.backend, "tokens_per_step": ctx.inputs.numel(), "finished": final,
            "results": public, "skipped": skipped}, f, indent=1)
    return text


# -----------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="flex", choices=("flex", "fa4"),
                        help="attention kernel on CUDA (fa4 needs flash-attn-4 importable); the CPU uses SDPA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch, for checking on the CPU")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="MODEL:PARTS[@MODE], comma-separated, "
                        "run in this order")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing; the first compiles")
    parser.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="seconds from the start after which no variant runs: one expected to end later is "
                             "skipped, one still running is stopped")
    parser.add_argument("--out", default=os.environ.get("OUT") or ".", help="directory for candidates.md and .json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=tg.Hyperparameters.peak_tflops)
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="auto: on CUDA only")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend; aot_eager checks tracing on the CPU cheaply (modes need inductor)")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="bf16 autocast on the CPU too (the GPU always has it), as the GPU computes")
    parser.add_argument("--profile", default="", help="variants (comma-separated) to profile after timing (bench.py)")
    return parser.parse_args(argv)


class Context:
    """What every variant shares: flags, device, configs, reference weights, the batch, the header."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but torch sees no CUDA GPU; use --device cpu --tiny")
        self.variants = [parse_variant(s) for s in args.variants.split(",") if s]
        self.profile = set(filter(None, args.profile.split(",")))
        shape = TINY if args.tiny else {}
        self.cfgs = {m: tg.ModelConfig(**shape, **{**MODELS[m], **({"window": TINY_WINDOW} if args.tiny and
                                                                  MODELS[m]["window"] else {})})
                     for m in dict.fromkeys(v.model for v in self.variants)}
        if self.device.type == "cuda":
            self.backend = args.backend
            for cfg in self.cfgs.values():  # fa4 that cannot run is an error naming the reason, before any work
                try:
                    tg.choose_attention_backend(args.backend, cfg, self.device)
                except ValueError as error:
                    raise SystemExit(f"error: --backend {args.backend}: {error}")
        else:
            self.backend = "sdpa"  # FlexAttention has no backward on the CPU; train_gpt uses the dense mask there
        self.compile = args.compile == "on" or (args.compile == "auto" and self.device.type == "cuda")
        bf16 = self.device.type == "cuda" or args.cpu_bf16
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.states = {m: reference_state(cfg, args.seed) for m, cfg in self.cfgs.items()}
        self.n_params = {m: sum(t.numel() for t in s.values()) for m, s in self.states.items()}
        self.flops = {m: tg.training_flops_per_token(self.cfgs[m], self.n_params[m]) for m in self.cfgs}
        first = next(iter(self.cfgs.values()))
        B = TINY_BATCH if args.tiny else tg.Hyperparameters().micro_batch_tokens // first.seq_len
        tokens = torch.randint(0, min(first.vocab_size, tg.BOS_ID + 1), (B, first.seq_len + 1),
                               generator=torch.Generator().manual_seed(args.seed))
        self.inputs = tokens[:, :-1].contiguous().to(self.device)
        self.targets = tokens[:, 1:].contiguous().to(self.device)
        self.env = tg.environment(self.device, 1)
        card = self.env["device"]
        self.header = (f"{card}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; attention {self.backend}, "
                       f"{B} x {first.seq_len} tokens a step, compile {'on' if self.compile else 'off'}, "
                       f"autocast {'bf16' if bf16 else 'off (float32)'}, kernels {self.env['kernel_packages'] or '-'}")


def expected_seconds(variant: Variant, done: list) -> float:
    """A variant's expected wall time, from those before it: the last one's (its caches were as warm), three times
    the first's for the autotuning modes, which benchmark every matrix product's candidate kernels."""
    if not done:
        return 0.0
    if variant.mode.startswith("max-autotune"):
        return 3 * done[0]
    return done[-1]


def main(argv=None):
    args = parse_args(argv)
    torch._dynamo.config.recompile_limit = 64  # each variant is a new model; reset() between them clears the cache
    if hasattr(torch._inductor.config, "autotune_num_choices_displayed"):
        torch._inductor.config.autotune_num_choices_displayed = 0  # keep autotuning tables out of the output's tail
    try:
        ctx = Context(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    print(ctx.header, flush=True)
    print(f"parameters {ctx.n_params}, training FLOPs per token {ctx.flops}; variants: "
          f"{', '.join(v.spec for v in ctx.variants)}", flush=True)
    results, skipped, durations, references, stopped = [], [], [], {}, False
    signal.signal(signal.SIGALRM, on_deadline)
    for variant in ctx.variants:
        elapsed = time.perf_counter() - START
        expected = expected_seconds(variant, durations)
        if stopped or elapsed + expected > args.budget_s:
            reason = ("the budget ran out during an earlier variant" if stopped else
                      f"{elapsed:.0f} s elapsed + {expected:.0f} s expected > --budget-s {args.budget_s:.0f}")
            skipped.append({"spec": variant.spec, "reason": reason})
            print(f"skipped {variant.spec}: {reason}", flush=True)
            continue
        # the comparison reference of a model: its first ref variant in default mode
        is_reference = variant.parts == {"ref"} and variant.mode == "default" and variant.model not in references
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, max(args.budget_s - elapsed, 1.0), 5.0)  # again every 5 s until caught
        try:
            try:
                result = measure(variant, ctx, is_reference, references.get(variant.model))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Deadline:
            signal.setitimer(signal.ITIMER_REAL, 0)  # in case it struck between the alarm and the finally above
            result, stopped = {"spec": variant.spec, "status": "stopped",
                               "error": f"still running at --budget-s {args.budget_s:.0f}"}, True
        except Exception as error:  # a variant that fails is a row, not the end of the run
            print(traceback.format_exc()[-3000:], flush=True)  # compile errors run long; their end says most
            result = {"spec": variant.spec, "status": "error", "error": f"{type(error).__name__}: "
                      f"{' '.join(str(error).split())}"}
        if "_reference" in result:
            references[variant.model] = result.pop("_reference")
        result["wall_s"] = time.perf_counter() - t0
        if result["status"] == "ok":
            durations.append(result["wall_s"])
            print(f"{variant.spec}: {result['ms']:.1f} ms/step, {result['tokens_per_s']:,.0f} tokens/s, warm-up "
                  f"{result['warmup_s']:.0f} s, residual {result['residual']}, step-0 loss {result['loss0']:.6f}",
                  flush=True)
        else:
            print(f"{variant.spec}: {result['status']}: {result['error'][:300]}", flush=True)
        results.append(result)
        free_memory()
        write_outputs(ctx, results, skipped, final=False)
    text = write_outputs(ctx, results, skipped, final=True)
    print(f"\ntotal {time.perf_counter() - START:.0f} s; written to {os.path.abspath(args.out)}/candidates.md, .json\n")
    print(text, flush=True)
    # a compile stopped by the deadline can leave worker processes that would hold up a normal exit
    os._exit(0)


if __name__ == "__main__":
    main()
