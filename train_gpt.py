"""
Gated sliding-window attention against full causal attention, in one file.

A Qwen3-style decoder (pre-norm RMSNorm, RoPE, grouped-query attention with RMSNorm on q and k, SwiGLU
MLP, tied embeddings, no biases) trained on pre-tokenized GPT-2 shards. Attention is one function with two
knobs: `--window W` limits each query to itself and the W-1 tokens before it (0 = full causal), and
`--gate head` multiplies each head's output by g = sigmoid(W_g x + b_g), a learned gate per head and token,
as in "Dynamic Sparse Attention with Learned Head Gating" (`--mix-full true` is the paper's other reading: each head
mixes its windowed and its full causal attention, g * local + (1 - g) * global). Which keys a query sees is one
function, sliding_window_mask; on CUDA it runs through FlashAttention-4 (where installed) or FlexAttention, on
the CPU, where FlexAttention has no backward, as a dense mask for SDPA.

    python train_gpt.py --window 256 --gate head                 # one GPU (or the CPU)
    torchrun --standalone --nproc_per_node=8 train_gpt.py ...     # 8 GPUs, same global batch
    python train_gpt.py --resume logs/<run>                       # continue a stopped run from its checkpoint
"""
with open(__file__) as f:
    code = f.read()  # saved into every run's log directory, so a log can reproduce its run

import argparse
import dataclasses
import datetime
import fcntl
import functools
import glob
import hashlib
import importlib.metadata
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP

import fa4_ops

# -----------------------------------------------------------------------------
# Hyperparameters


@dataclass
class ModelConfig:
    """What the model is: GPT reads only these fields (the defaults give the paper's ~134M-parameter model)."""
    # shape
    vocab_size: int = 50304  # token ids: GPT-2's 50257 padded to a multiple of 128
    n_layer: int = 12  # transformer blocks
    d_model: int = 768  # width of the residual stream
    n_head: int = 12  # query heads
    n_kv_head: int = 4  # key/value heads, shared by n_head // n_kv_head query heads each
    head_dim: int = 128  # channels per head
    mlp_hidden: int = 2048  # the SwiGLU MLP's hidden width
    rope_base: float = 10000.0  # the rotary embeddings' base (RoFormer's)
    seq_len: int = 1024  # tokens per sequence (the rotary tables' length)

    # attention: which keys a query sees (sliding_window_mask) and how each head's output is gated (Gate)
    window: int = 0  # tokens each query sees, itself included; 0 = full causal
    gate: str = "none"  # "none"; "head": a sigmoid gate per head and token on the attention output; the head gate's
    # variants "channel", "head-nobias" and "head-open"; the controls "const" (x 0.5) and "scalar" (one learned g per
    # head, whatever the token) (Gate)
    mix_full: bool = False  # the gate g mixes each head's windowed attention (g) with its full causal attention
    # (1 - g) instead of scaling it: a second attention pass, the paper's other reading; needs --window and --gate

    @classmethod
    def from_args(cls, args: "Hyperparameters") -> "ModelConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


@dataclass
class Hyperparameters(ModelConfig):
    """Every field, the model's included, is a command-line flag: --field-name value. The comment after a field (and
    the comment lines right below it) is its --help; a comment after a blank line heads the group of flags below it."""
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of training shards
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of validation shards
    val_tokens: int = 10_485_760  # tokens per evaluation, the same ones every time

    # optimisation
    batch_tokens: int = 524_288  # tokens per optimizer step, over all GPUs and accumulation steps
    micro_batch_tokens: int = 65_536  # tokens per forward/backward on one device
    steps: int = 5000  # optimizer steps (the default sees 2.6B tokens, ~20 per parameter)
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 200  # linear warmup from 0
    cooldown_steps: int = 1000  # linear decay to 0 over the last steps
    weight_decay: float = 0.1  # AdamW's, on matrices and embeddings only
    beta1: float = 0.9  # AdamW's decay rate of the gradient's running mean
    beta2: float = 0.95  # AdamW's decay rate of the squared gradient's running mean
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    seed: int = 0  # the initial weights, and the data order unless --data-seed is given
    data_seed: int = -1  # the order in which training reads its windows (DataLoader); -1 = --seed

    # speed: the same model and training on every choice
    attention_backend: str = "auto"  # CUDA kernel: "fa4" (FlashAttention-4), "flex" (FlexAttention), or "auto":
    # fa4 where it can run, else flex. The CPU always uses SDPA with the dense mask
    loss: str = "plain"  # "plain" (logits, then cross-entropy: the fastest measured), "fused" (liger-kernel's
    # fused linear cross-entropy, CUDA: 6 GB less memory at 65,536 tokens a micro-step, 4% slower; docs/performance.md)
    # or "fp8" (the output layer's three products in FP8, then the plain cross-entropy: fp8_linear; an H100 or newer)
    compile: bool = True  # torch.compile the model (CUDA only)

    # evaluation and logging
    val_every: int = 250  # steps between evaluations (and at the end); 0 = only at the end
    eval_seq_lens: str = ""  # after the last step, also evaluate the same validation tokens cut into sequences of
    # these lengths, e.g. "2048,4096,8192" (rotary tables and masks built for each); "" = none
    log_dir: str = "logs"  # each run gets a new subdirectory here
    run_name: str = "run"  # prefix of the run's directory name (a name, not a path)
    peak_tflops: float = 790.0  # bf16 dense peak of one GPU, in TFLOP/s, for MFU (measured on H100 and H200)

    # checkpoints and guards
    save_every: int = 500  # steps between checkpoints, plus one after the last step; 0 = only that one
    keep_checkpoints: int = 2  # this run's newest checkpoints kept on disk; 0 = all
    resume: str = ""  # continue from this checkpoint, or from a run directory's newest one; "" = a new run
    skip_nonfinite: int = 0  # steps with a non-finite loss or gradient norm skipped (no update) before the run stops

    # distributed: a rank that waits longer than dist_timeout for the others in one collective fails, and so the job
    # does, rather than a hung or lost rank holding every GPU forever. A healthy run waits longest while one rank
    # compiles the first steps after another has finished (minutes on a GPU) and while rank 0 writes a checkpoint
    # (weights and AdamW's two moments in float32, 12 bytes a parameter: 1.6 GB for the default model, 800 s even at
    # 2 MB/s); the default leaves room for both
    dist_timeout: int = 900  # seconds


ATTENTION_BACKENDS = ("auto", "flex", "fa4")  # --attention-backend's values
LOSSES = ("plain", "fused", "fp8")  # --loss's values


def flag_choices() -> dict:
    """The flags that take one of a few names, and those names (GATES is defined with Gate, below)."""
    return {"gate": GATES, "attention_backend": ATTENTION_BACKENDS, "loss": LOSSES}


FIELD_LINE = re.compile(r"    (\w+): [^=]+= .*?(?:  # (.*))?")
COMMENT_LINE = re.compile(r"    # (.*)")


def field_docs() -> dict:
    """{field: [its group's heading, its help]}, read from the comments of ModelConfig and Hyperparameters (the
    convention their docstring states), so that --help says what the source says."""
    docs, heading, target = {}, "", None  # target: the field a comment line continues, "" a heading, None neither
    for cls in (ModelConfig, Hyperparameters):
        for line in inspect.getsource(cls).splitlines():
            if field_line := FIELD_LINE.fullmatch(line):
                target = field_line[1]
                docs[target] = [heading, field_line[2] or ""]
            elif comment := COMMENT_LINE.fullmatch(line):
                if target is None:
                    heading, target = comment[1], ""
                elif target == "":
                    heading += "\n" + comment[1]  # kept as written: the help prints a group's heading unwrapped
                else:
                    docs[target][1] += " " + comment[1]
            else:
                target = None
    return docs


def given_flags(argv=None) -> dict:
    """The flags on the command line, {field: value}: one `--field value` flag per Hyperparameters field; unknown
    flags are errors. Only those given, so that a resumed run takes the rest from its checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    docs, groups, choices = field_docs(), {}, flag_choices()
    for f in fields(Hyperparameters):
        heading, text = docs[f.name]
        title, _, description = heading.partition(": ")
        if title not in groups:
            groups[title] = parser.add_argument_group(title, description or None)
        default = repr(f.default) if isinstance(f.default, str) else str(f.default).lower()  # as a flag takes it
        kwargs = {"help": f"{text} (default: {default})".replace("%", "%%")}  # argparse %-formats help
        if f.type is bool or f.type == "bool":
            kwargs.update(type=_parse_bool, metavar="true|false")
        else:
            kwargs.update(type=type(f.default), metavar="|".join(choices[f.name]) if f.name in choices else None)
        groups[title].add_argument(flag(f.name), **kwargs)
    return vars(parser.parse_args(argv))


def parse_args(argv=None) -> Hyperparameters:
    """A new run's Hyperparameters: the defaults, with the flags given."""
    return Hyperparameters(**given_flags(argv))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# -----------------------------------------------------------------------------
# Attention masks: one visibility rule, and what each kernel needs of it


def sliding_window_mask(cfg: ModelConfig):
    """The visibility rule, as a FlexAttention mask_mod: key j is visible from query i iff j <= i and, with a
    window W > 0, i - j < W. Every mask below, the FLOPs count and the probe's window start are derived from it."""
    window = cfg.window

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx
        if window > 0:
            visible = visible & (q_idx - kv_idx < window)
        return visible

    return mask_mod


def dense_mask(mask_mod, seq_len: int, device, rows=None) -> torch.Tensor:
    """mask_mod as a boolean (T, T) tensor (rows: only those query rows)."""
    idx = torch.arange(seq_len, device=device)
    q_idx = idx if rows is None else idx[rows]
    return mask_mod(None, None, q_idx[:, None], idx[None, :])


MASK_ROWS = 1024  # query rows per slice, so that T = 16384 never needs T x T comparisons at once (2 GB)


def mask_row_slices(mask_mod, seq_len: int, device):
    """mask_mod a slice of MASK_ROWS query rows at a time: (their positions (R, 1), their rows (R, T))."""
    for r in range(0, seq_len, MASK_ROWS):
        rows = slice(r, r + MASK_ROWS)
        yield torch.arange(seq_len, device=device)[rows, None], dense_mask(mask_mod, seq_len, device, rows)


def visible_pairs(mask_mod, seq_len: int) -> int:
    """How many (query, key) pairs mask_mod lets attend at this length: the attention work MFU counts."""
    return sum(int(visible.sum()) for _, visible in mask_row_slices(mask_mod, seq_len, "cpu"))


@dataclass(frozen=True)
class FlashWindow:
    """The mask as FlashAttention-4 takes it: key j visible from query i iff 0 <= i - j <= left (None: any j <= i)."""
    left: Optional[int]


def flash_window(mask_mod, seq_len: int, device) -> Optional[FlashWindow]:
    """FlashAttention-4's window_size = (left, 0) that gives exactly mask_mod's visibility at this length, read off
    the rule itself; None where no band does (a rule that is not a causal sliding window)."""
    j, left = torch.arange(seq_len, device=device)[None, :], -1
    for i, visible in mask_row_slices(mask_mod, seq_len, device):  # the widest reach back of any query
        if (visible & (j > i)).any():
            return None
        left = max(left, int(torch.where(visible, i - j, -1).max()))
    for i, visible in mask_row_slices(mask_mod, seq_len, device):  # and every query sees exactly that band
        if not torch.equal(visible, (j <= i) & (i - j <= left)):
            return None
    return FlashWindow(None if left == seq_len - 1 else left)


def build_mask(mask_mod, seq_len: int, device, backend: str):
    """mask_mod as `backend` takes it: a FlexAttention BlockMask, a FlashWindow, or a dense boolean mask for SDPA.
    Built once per length, outside forward, so the compiled model never recompiles for it."""
    if backend == "flex":
        global _compiled_flex_attention
        if _compiled_flex_attention is None:
            _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)
    if backend == "fa4":
        window = flash_window(mask_mod, seq_len, device)
        if window is None:
            raise ValueError("--attention-backend fa4: FlashAttention-4 runs sliding windows only, and "
                             "sliding_window_mask is not one; use --attention-backend flex")
        return window
    return dense_mask(mask_mod, seq_len, device)


class AttentionMasks(NamedTuple):
    """What GPT.masks builds and every Attention layer reads: the rule's mask, and the full causal mask that
    --mix-full mixes it with (None otherwise: Attention then has one pass)."""
    local: object
    full: object = None


# -----------------------------------------------------------------------------
# Attention kernels: FlashAttention-4 (optional; its custom ops are in fa4_ops.py), FlexAttention, SDPA

# torch.compile(flex_attention), made by build_mask with the first BlockMask: uncompiled flex is a slow reference,
# and compiling it at import would cost every process about 3 s, CPU runs too, which train with SDPA
_compiled_flex_attention = None


def attention(q, k, v, mask):
    """Masked softmax attention for q (B, H, T, D) and k, v (B, H_kv, T, D), with H a multiple of H_kv.

    The only place that picks a kernel, by the mask's kind (build_mask): FlashAttention-4 for a FlashWindow,
    FlexAttention for a BlockMask (CUDA), SDPA for a dense boolean mask (the CPU, where FlexAttention has no
    backward). The tests check that they agree. FlashAttention-4 takes (B, T, H, D): q, k, v come from
    Attention.qkv as transposed views of that layout, so the transposes here copy nothing."""
    if isinstance(mask, FlashWindow):
        out, _ = fa4_ops.fa4_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     -1 if mask.left is None else mask.left)
        return out.transpose(1, 2)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    flex = _compiled_flex_attention or flex_attention  # uncompiled only for a BlockMask that build_mask did not make
    return flex(q, k, v, block_mask=mask, enable_gqa=True)


def choose_attention_backend(requested: str, cfg: ModelConfig, device: torch.device) -> tuple[str, str]:
    """The kernel --attention-backend asks for, as build_mask names it ("fa4", "flex" or, on the CPU, "sdpa"),
    and a note on why when auto falls back to flex. A fa4 that cannot run is an error naming the flag."""
    if device.type == "cuda" and requested == "flex":
        return "flex", ""
    _, reason = fa4_ops.flash_attention_4() if device.type == "cuda" else (None, "the device is the CPU")
    if not reason and flash_window(sliding_window_mask(cfg), cfg.seq_len, device) is None:
        reason = "sliding_window_mask is not a sliding window, and FlashAttention-4 runs only those"
    if not reason and cfg.head_dim not in (64, 96, 128):
        reason = f"--head-dim {cfg.head_dim}: FlashAttention-4 on Hopper takes 64, 96 or 128"
    if requested == "fa4" and reason:
        hint = ("install flash-attn-4 with the README's optional pip line on a Hopper or newer GPU, or "
                if "import" in reason or "GPU" in reason or "CPU" in reason else "")
        raise ValueError(f"--attention-backend fa4 cannot run here: {reason}; {hint}use --attention-backend flex")
    if device.type != "cuda":  # FlexAttention has no backward on the CPU
        return "sdpa", ""
    return ("flex", f"attention backend flex, not fa4: {reason}") if reason else ("fa4", "")


# -----------------------------------------------------------------------------
# Model


def rotary_tables(head_dim: int, max_seq_len: int, base: float):
    """cos and sin of shape (T, D/2): pair (d, d + D/2) of each head turns by position * base^(-2d/D)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); cos, sin: (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


GATES = ("none", "head", "channel", "head-nobias", "head-open", "const", "scalar")  # --gate; Gate says what each does


class Gate(nn.Module):
    """The gate on the attention output, from the attention's normed input x: g = sigmoid(W_g x + b_g), in (0, 1).

    --gate head (the paper's): one gate per head and token. It starts with W_g = 0 and b_g = 0: every gate
    is 0.5, the sigmoid's steepest point, so it learns fastest there and starts from no preference between heads or
    tokens; the constant factor 0.5 is absorbed by o_proj. The variants, for the study of which part matters:
    channel, one gate per channel of each head (n_head x head_dim outputs, the elementwise gate of Qwen's gated
    attention); head-nobias, no b_g; head-open, started at b_g = 3 (g = 0.95), so the model starts almost as the
    window-only one, though with a gradient about 5x smaller (sigmoid's slope 0.045 against 0.25).
    And two controls that ignore the input, for whether the gate's gain is only its scale: const, every head's output
    times 0.5, the value the head gate starts at, with no parameters; scalar, a learned g = sigmoid(b_h) per head,
    started at b_h = 0."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.width = cfg.n_head, cfg.head_dim if cfg.gate == "channel" else 1
        reads_input = cfg.gate not in ("const", "scalar")
        self.weight = nn.Parameter(torch.empty(cfg.n_head * self.width, cfg.d_model)) if reads_input else None
        self.bias = (None if cfg.gate in ("head-nobias", "const")
                     else nn.Parameter(torch.empty(cfg.n_head * self.width)))
        self.initial_bias = 3.0 if cfg.gate == "head-open" else 0.0

    def init_parameters(self):
        if self.weight is not None:
            nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.constant_(self.bias, self.initial_bias)

    def forward(self, x):
        """x (B, T, d_model) -> g (B, T, H, 1), or (B, T, H, D) per channel, to scale each head's output (B, T, H, D)."""
        B, T, _ = x.shape
        if self.weight is None:  # const and scalar: one g per head, whatever the token
            logit = self.bias if self.bias is not None else x.new_zeros(self.n_head)
            return torch.sigmoid(logit.to(x.dtype)).view(1, 1, self.n_head, 1).expand(B, T, -1, -1)
        return torch.sigmoid(F.linear(x, self.weight, self.bias)).view(B, T, self.n_head, self.width)


def gate_mix(g, local, full):
    """--mix-full: g of the windowed attention and 1 - g of the full causal one (outputs, or attention weights)."""
    return g * local + (1 - g) * full


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.gate = Gate(cfg) if cfg.gate != "none" else None
        self.observer = None  # probe() sets a function here to see this layer's queries, keys, gates and masks

    def qkv(self, x, cos, sin):
        """Queries (B, H, T, D) and keys, values (B, H_kv, T, D), normalised and rotated: views of (B, T, H, D)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim))
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, masks: AttentionMasks):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        y = attention(q, k, v, masks.local).transpose(1, 2)  # B, T, H, D
        g = self.gate(x) if self.gate is not None else None  # B, T, H, 1 (B, T, H, D: a gate per channel)
        if masks.full is not None:  # --mix-full: a second, full causal pass
            y = gate_mix(g, y, attention(q, k, v, masks.full).transpose(1, 2))
        elif g is not None:
            y = y * g  # on flex, fused by torch.compile into the copy that lays y out for o_proj
        if self.observer is not None:
            self.observer(q, k, g, masks)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, masks: AttentionMasks):
        x = x + self.attn(self.input_norm(x), cos, sin, masks)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, loss_kernel: str = "plain"):
        super().__init__()
        # init_weights draws from the random state as it is now, not as building the modules left it, so one seed
        # gives models with and without a gate the same values of every other weight
        rng_state = torch.get_rng_state()
        self.cfg = cfg
        self.loss_kernel = loss_kernel  # "plain", "fused" or "fp8" (check_loss): how forward computes the loss
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        cos, sin = rotary_tables(cfg.head_dim, cfg.seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        torch.set_rng_state(rng_state)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """All initialisation, in one place, one rule per kind of parameter; a parameter with no rule is an error.

        Matrices and the embedding: normal(0, 0.02), as GPT-2. The residual-branch outputs (o_proj,
        down_proj) are scaled down by sqrt(2 * n_layer), so the residual stream's variance does not grow
        with depth (GPT-2). With the tied embedding this makes the logits small, and the first loss sits near
        ln(vocab_size), the loss of a uniform guess. RMSNorm weights start at 1; the gate as Gate says."""
        residual_outputs = {m for block in self.blocks for m in (block.attn.o_proj, block.mlp.down_proj)}
        for module_name, module in self.named_modules():
            if isinstance(module, Gate):
                module.init_parameters()
                continue
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.Linear) and name == "weight":
                    std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if module in residual_outputs else 0.02
                    nn.init.normal_(p, std=std)
                elif isinstance(module, nn.Embedding) and name == "weight":
                    nn.init.normal_(p, std=0.02)
                elif isinstance(module, nn.RMSNorm) and name == "weight":
                    nn.init.ones_(p)
                else:
                    raise ValueError(f"init_weights has no rule for parameter {module_name}.{name} "
                                     f"({type(module).__name__}); give it one")

    def masks(self, seq_len: int, device, backend: str = "sdpa") -> AttentionMasks:
        """This model's attention masks for sequences of seq_len, as `backend` (build_mask) takes them; the
        dense "sdpa" masks serve any device and any length (sampling, the probe)."""
        full = sliding_window_mask(dataclasses.replace(self.cfg, window=0)) if self.cfg.mix_full else None
        return AttentionMasks(build_mask(sliding_window_mask(self.cfg), seq_len, device, backend),
                              None if full is None else build_mask(full, seq_len, device, backend))

    def hidden(self, idx, masks: AttentionMasks):
        """idx: (B, T) token ids; returns the final normed hidden states (B, T, d_model)."""
        T = idx.size(1)
        if T <= self.rope_cos.size(0):
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:  # longer than training (--eval-seq-lens): the same turns per position, continued
            cos, sin = (t.to(idx.device) for t in rotary_tables(self.cfg.head_dim, T, self.cfg.rope_base))
        x = self.embed(idx)
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in autocast's dtype (bf16 on CUDA), as each branch's output is: half the bytes of
            # float32 in every add and norm, for 5% of a step on an H200 (docs/performance.md)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for block in self.blocks:
            x = block(x, cos, sin, masks)
        return self.final_norm(x)

    def logits(self, idx, masks: AttentionMasks):
        """idx: (B, T) token ids; returns the next-token logits (B, T, vocab_size)."""
        return F.linear(self.hidden(idx, masks), self.embed.weight)  # tied output layer

    def forward(self, idx, targets, masks: AttentionMasks):
        """idx, targets: (B, T) token ids; returns the mean cross-entropy in float32. With loss_kernel "fused"
        (check_loss) it is liger-kernel's fused linear cross-entropy, which computes the logits a chunk of tokens at
        a time, so the (B * T, vocab) float32 logits never exist at once: the same value, gradients within bf16
        rounding, in a quarter of the memory (bench.py's loss table). With "fp8" the output layer's products run in
        FP8 (fp8_linear) when there is a backward pass: not the same arithmetic, a speed option whose training is
        checked against bf16 runs; evaluation (no gradient) stays plain, so val losses compare across losses."""
        x = self.hidden(idx, masks)
        if self.loss_kernel == "fused":
            return fused_linear_cross_entropy(self.embed.weight.to(torch.bfloat16), x.flatten(0, 1).to(torch.bfloat16),
                                              targets.flatten())
        if self.loss_kernel == "fp8" and torch.is_grad_enabled():
            logits = fp8_linear(x.flatten(0, 1), self.embed.weight)
        else:
            logits = F.linear(x, self.embed.weight).flatten(0, 1)
        return F.cross_entropy(logits.float(), targets.flatten())


@functools.cache
def liger_loss_module():
    """liger-kernel's fused linear cross-entropy module (optional, CUDA), called as f(weight, x, targets); or None
    where it does not import. Imported on first use, not with this file, and built once."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)


def fused_linear_cross_entropy(weight, x, targets):
    """The mean cross-entropy of the logits x @ weight^T against targets, a chunk of tokens at a time (liger-kernel)."""
    return liger_loss_module()(weight, x, targets)


if torch.cuda.is_available():  # the only place it runs (check_loss); the wrapper imports torch's compiler, ~2 s
    # run as it is, between compiled graphs: its host-side .item() and Triton launches do not trace
    fused_linear_cross_entropy = torch.compiler.disable(fused_linear_cross_entropy)


def to_fp8(t, dtype):
    """t scaled by a power of two that brings its largest magnitude just under dtype's largest, then cast to dtype;
    returns it with the inverse scale (a float32 scalar) that undoes it. A power of two scales exactly, so the cast is
    the only rounding. The scale follows the tensor every call, so nothing overflows."""
    largest = t.detach().abs().amax().float()
    # at most 2^100, so an all-zero tensor stays zeros (its scale would be infinite) and the inverse stays finite
    scale = torch.exp2(torch.floor(torch.log2(torch.finfo(dtype).max / largest)).clamp(max=100))
    return (t * scale.to(t.dtype)).to(dtype), scale.reciprocal()  # in t's dtype: exact, and no float32 copy of t


class FP8Linear(torch.autograd.Function):
    """x @ weight^T for x (N, d) and weight (V, d) with torch._scaled_mm, FP8's matrix product: x and weight in e4m3
    (3 mantissa bits) for the forward, and the incoming gradient in e5m2 (2 mantissa bits, more range) for the two
    backward products, each tensor scaled by to_fp8. Returns bf16 logits; the gradients come in float32 (weight) and
    x's dtype. _scaled_mm takes its first operand row-major and its second column-major, hence the transposes."""

    @staticmethod
    def forward(ctx, x, weight):
        x8, x_inv = to_fp8(x, torch.float8_e4m3fn)
        w8, w_inv = to_fp8(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.x_dtype = x.dtype
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(grad.contiguous(), torch.float8_e5m2)
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_inv, scale_b=w_inv, out_dtype=ctx.x_dtype)
        grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=torch.float32)
        return grad_x, grad_w


def fp8_linear(x, weight):
    """--loss fp8's output layer, x (N, d) @ weight (V, d)^T in FP8 (FP8Linear): the largest product of the step
    (6 x d x vocab FLOPs a token), on the FP8 tensor cores of an H100 or newer. Every dimension a multiple of 16."""
    return FP8Linear.apply(x, weight)


def check_loss(requested: str, device: torch.device, cfg: ModelConfig, tokens_per_call: int) -> str:
    """The loss --loss asks for; a fused or FP8 loss that cannot run here is an error naming the flag. No "auto": the
    plain loss is the faster one (docs/performance.md), so it is the default, and the fused one is for saving memory.
    FP8 runs on the CPU too (slowly: for the tests)."""
    if requested == "fp8":
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(f"--loss fp8 cannot run here: {torch.cuda.get_device_name(device)} has no FP8 matrix "
                             f"products (an H100, H200, L40S or newer has); use --loss plain")
        sizes = {"--vocab-size": cfg.vocab_size, "--d-model": cfg.d_model, "--micro-batch-tokens": tokens_per_call}
        if any(size % 16 for size in sizes.values()):
            raise ValueError("--loss fp8 needs " + ", ".join(f"{flag} {size}" for flag, size in sizes.items())
                             + " to be multiples of 16 (FP8's matrix products); change them or use --loss plain")
    if requested == "fused":
        reason = ("the device is the CPU" if device.type != "cuda"
                  else "liger-kernel does not import" if liger_loss_module() is None else "")
        if reason:
            raise ValueError(f"--loss fused cannot run here: {reason}; install liger-kernel with the README's optional "
                             f"pip line on a CUDA GPU, or use --loss plain")
    return requested


def attention_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs of QK^T and PV per token, counting only the (query, key) pairs the visibility rule lets
    attend: 2 matmuls x 2 FLOPs per multiply-add x head_dim per pair, x3 for forward + backward. --mix-full adds
    its second, full causal pass."""
    pairs = visible_pairs(sliding_window_mask(cfg), cfg.seq_len)
    if cfg.mix_full:
        pairs += visible_pairs(sliding_window_mask(dataclasses.replace(cfg, window=0)), cfg.seq_len)
    return 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * pairs / cfg.seq_len


def training_flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """MFU's FLOPs per token: 6 per parameter (forward + backward) plus the attention FLOPs done."""
    return 6 * n_params + attention_flops_per_token(cfg)


# -----------------------------------------------------------------------------
# Data
# Shard format, written by data/fineweb.py's write_shard and read here: a header of HEADER_INTS int32
# (SHARD_MAGIC, SHARD_VERSION, token count, then zeros), then the tokens as uint16, each document starting
# with BOS_ID (GPT-2's <|endoftext|>). The same layout as the pre-tokenized FineWeb shards.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
BOS_ID = 50256
_FIX = "re-create it with data/fineweb.py (delete it first)"
SHARD_CHECK_TOKENS = 1 << 24  # tokens checked at a time (32 MB), so checking a shard never holds all of it


def read_shard_header(path: str) -> int:
    """Returns the shard's token count after checking its magic, version and size."""
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_INTS * 4}-byte header; {_FIX}")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: magic number {header[0]}, expected {SHARD_MAGIC}; not a token shard, or {_FIX}")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: format version {header[1]}, expected {SHARD_VERSION}; {_FIX}")
    expected = HEADER_INTS * 4 + 2 * int(header[2])
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, but its header's {header[2]} tokens need {expected}; "
                         f"the file is truncated or damaged; {_FIX}")
    return int(header[2])


def load_shard(path: str, vocab_size: int) -> np.ndarray:
    """A shard's tokens as a read-only uint16 memory map, after checking the header and that every id is
    < vocab_size: the pages are read once here and then come from the OS's cache, so 27 FineWeb shards cost no RAM
    of the process's own."""
    count = read_shard_header(path)
    if count == 0:  # a memory map cannot be empty
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(count,))
    for start in range(0, count, SHARD_CHECK_TOKENS):
        chunk = tokens[start : start + SHARD_CHECK_TOKENS]
        if chunk.max() >= vocab_size:
            position = start + int(np.argmax(chunk >= vocab_size))
            raise ValueError(f"{path}: token id {tokens[position]} at position {position} is >= the vocabulary "
                             f"size {vocab_size}; the shard was made by another tokenizer, or pass --vocab-size")
    return tokens


def write_shard(path: str, tokens) -> None:
    """Writes tokens (ids < 2**16) as a shard, through a temporary file so a crash never leaves a partial one."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must lie in [0, 65536) to fit uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def find_shards(pattern: str, flag: str) -> list:
    files = sorted(glob.glob(pattern))
    if not files:
        raise ValueError(f"--{flag} {pattern!r} matches no files; download FineWeb with `python data/fineweb.py`, "
                         f"tokenize your own text with `python data/fineweb.py --tokenize`, or fix the pattern")
    return files


DATA_ORDER = "windows"  # how DataLoader orders its reads; checkpoints of another order cannot continue their stream


class DataLoader:
    """Yields (inputs, targets) of shape (B, T) from windows of T + 1 tokens over the shards end to end: window w
    holds tokens w * T .. w * T + T, so its last token, the last target, is the next window's first input.

    Seeded (training), the windows come in a random order drawn anew each epoch from (seed, epoch): two seeds read
    different data in different orders, and no epoch repeats another. Unseeded (validation), they come in order,
    the same tokens every time. Micro-step k of rank r of W reads windows (k * W + r) * B .. + B - 1 of that
    sequence of epochs. So ranks never share a window, every window is read once per epoch over all ranks, and one
    process with W times the accumulation reads the same windows in the same steps as W processes: the number of
    GPUs changes the speed, not the data."""

    def __init__(self, files, B, T, rank, world_size, vocab_size, device, seed=None):
        self.files, self.B, self.T = files, B, T
        self.rank, self.world_size, self.device, self.seed = rank, world_size, device, seed
        self.shards = [load_shard(f, vocab_size) for f in files]
        self.shard_tokens = [len(tokens) for tokens in self.shards]
        self.shard_starts = np.cumsum([0] + self.shard_tokens)  # each shard's first token in the stream
        self.tokens_per_epoch = int(self.shard_starts[-1])
        self.windows_per_epoch = (self.tokens_per_epoch - 1) // T  # the last window needs one token past it
        if self.windows_per_epoch < world_size * B:
            raise ValueError(f"{len(files)} shard(s) from {files[0]} hold {self.tokens_per_epoch} tokens, fewer than "
                             f"the {world_size * B * T + 1} of one batch (world size x micro-batch + 1); use a "
                             f"smaller --micro-batch-tokens or more data")
        self._epoch_order = (None, None)  # (epoch, its window order), drawn once per epoch
        self.reset()

    def reset(self):
        self.position = 0  # tokens consumed by all ranks together (windows x T): the state a checkpoint keeps

    def seek(self, position: int):
        """Continues as if next_batch had consumed `position` tokens over all ranks."""
        self.position = position

    @property
    def epoch(self) -> int:
        return self.position // self.T // self.windows_per_epoch

    def first_batch(self):
        """This rank's inputs of the first micro-batch; the loader is reset."""
        self.reset()
        inputs, _ = self.next_batch()
        self.reset()
        return inputs

    def window_order(self, epoch: int) -> np.ndarray:
        if self.seed is None:
            return np.arange(self.windows_per_epoch)
        if self._epoch_order[0] != epoch:
            self._epoch_order = epoch, np.random.default_rng((self.seed, epoch)).permutation(self.windows_per_epoch)
        return self._epoch_order[1]

    def window(self, w: int) -> np.ndarray:
        """Window w's T + 1 tokens, read across a shard boundary where it lies on one."""
        start, end = w * self.T, w * self.T + self.T + 1
        pieces, shard = [], int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while start < end:
            offset = start - self.shard_starts[shard]
            piece = self.shards[shard][offset : offset + end - start]
            pieces.append(piece)
            start, shard = start + len(piece), shard + 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def next_batch(self):
        B, T = self.B, self.T
        first = self.position // T + self.rank * B  # this rank's first window in the sequence of epochs
        rows = []
        for n in range(first, first + B):
            epoch, index = divmod(n, self.windows_per_epoch)
            rows.append(self.window(int(self.window_order(epoch)[index])))
        self.position += self.world_size * B * T
        chunk = torch.from_numpy(np.stack(rows).astype(np.int64))  # B, T + 1
        if self.device.type == "cuda":
            chunk = chunk.pin_memory().to(self.device, non_blocking=True)
        return chunk[:, :-1], chunk[:, 1:]


# -----------------------------------------------------------------------------
# Optimizer, schedule, evaluation and probes


def make_optimizer(model: nn.Module, args: Hyperparameters) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices and the embedding only, not on the norms' weights or the gate's bias;
    fused on CUDA. get_lr sets the learning rate every step."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(args.beta1, args.beta2), fused=next(model.parameters()).is_cuda)


def get_lr(step: int, args: Hyperparameters) -> float:
    """Linear warmup, constant, then linear cooldown to 0 over the last cooldown_steps (warmup-stable-decay)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if step >= args.steps - args.cooldown_steps:
        return args.lr * (args.steps - step) / args.cooldown_steps
    return args.lr


@torch.no_grad()
def evaluate(model, loader: DataLoader, steps: int, masks: AttentionMasks) -> float:
    """Mean loss over the loader's first `steps` batches on every rank: the same tokens each call."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=loader.device)
    for _ in range(steps):
        inputs, targets = loader.next_batch()
        with autocast(loader.device):
            total += model(inputs, targets, masks).float()
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return total.item() / (steps * loader.world_size)


PROBE_CHUNK = 4  # sequences per pass, so the (4, H, T, T) float32 attention weights stay small at T = 1024


def attention_weights(q, k, mask):
    """softmax(q k^T / sqrt(D)) under a dense boolean mask, for q (B, H, T, D) and k (B, H_kv, T, D): (B, H, T, T).
    The probe's own: the kernels of attention() never materialise the weights."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.size(-1) ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


@torch.no_grad()
def probe(model: GPT, idx) -> dict:
    """How the attention of `model` behaves on validation tokens idx (B, T), per layer, in float32:
    gates (gated models): per head, the mean and standard deviation of g (over tokens, and a channel gate's
    channels) and the fractions under 0.1 and over 0.9; sinks: the mean share of attention a query puts on the
    sequence's first token, and on the first token it sees (the oldest key of its window; the same token under
    full attention).
    Each layer's Attention hands its queries, keys, gates and masks over from the forward pass itself (its
    observer), run with dense masks, and the weights are computed from them here: under --mix-full they are the
    mixture a head's output is made of (averaged over a channel gate's channels); a --gate head gate scales the
    output, not the weights, so there they are the softmax's."""
    was_training = model.training
    model.eval()
    T, device, n_layer = idx.size(1), idx.device, len(model.blocks)
    masks = model.masks(T, device)
    first_visible = masks.local.int().argmax(-1)  # per query, the first key the visibility rule lets it see
    queries = torch.arange(T, device=device)
    gates, first_share, start_share = [[] for _ in range(n_layer)], [0.0] * n_layer, [0.0] * n_layer

    def observer(layer):
        def observe(q, k, g, masks):  # q (B, H, T, D), k (B, H_kv, T, D), g (B, T, H, 1 or D) or None
            weights = attention_weights(q, k, masks.local)  # B, H, T, T
            if masks.full is not None:  # each channel's mixture, averaged over the head's channels
                g_head = g.mean(-1, keepdim=True).transpose(1, 2)  # B, H, T, 1
                weights = gate_mix(g_head, weights, attention_weights(q, k, masks.full))
            if g is not None:  # per head: its gates over tokens (and channels)
                gates[layer].append(g.transpose(2, 3).reshape(-1, g.size(2)))
            first_share[layer] += weights[..., 0].sum().item()
            start_share[layer] += weights[:, :, queries, first_visible].sum().item()
        return observe

    for layer, block in enumerate(model.blocks):
        block.attn.observer = observer(layer)
    try:
        for chunk in idx.split(PROBE_CHUNK):
            model.hidden(chunk, masks)
    finally:
        for block in model.blocks:
            block.attn.observer = None
    n_queries = idx.numel() * model.cfg.n_head
    result = {"sinks": {"first_token": [round(s / n_queries, 5) for s in first_share],
                        "window_start": [round(s / n_queries, 5) for s in start_share]}}
    if model.cfg.gate != "none":
        g = [torch.cat(values) for values in gates]  # per layer: (B * T * gate width, H)
        stats = {"mean": lambda v: v.mean(0), "std": lambda v: v.std(0),
                 "below_0.1": lambda v: (v < 0.1).float().mean(0), "above_0.9": lambda v: (v > 0.9).float().mean(0)}
        result["gates"] = {name: [[round(value, 5) for value in stat(layer).tolist()] for layer in g]
                           for name, stat in stats.items()}
    model.train(was_training)
    return result


def autocast(device: torch.device):
    """bf16 on CUDA; float32 on CPU, where bf16 matmuls are slow on most processors."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# -----------------------------------------------------------------------------
# Checkpoints
# A checkpoint holds everything the next step depends on: weights, AdamW's moments and step counts, the data
# stream's position, the RNG states and the config. So a resumed run computes the same losses as one that
# never stopped (bit for bit on the CPU with the same world size and micro-batch). Only tensors and plain
# values are stored, so loading needs no pickled code (weights_only).

CHECKPOINT_NAME = re.compile(r"ckpt_step(\d+)\.pt")
# what every checkpoint holds; those written since the loader read windows (DATA_ORDER) also hold data_order, which
# only resuming needs, so sample.py and export_hf.py still read the older ones
CHECKPOINT_KEYS = {"step", "model", "optimizer", "data_position", "rng_cpu", "rng_cuda", "config", "train_shards",
                   "world_size", "train_time_s", "nonfinite_skipped"}

# Flags a resumed run may change on purpose: the schedule and its length, evaluation, logging and speed. Every
# other field must match the checkpoint's: the model, the batch and the data order (batch_tokens, seq_len,
# seed), and AdamW's betas and weight decay, whose moments the checkpoint holds. The micro-batch (and the world
# size) may change because every step still reads the same tokens (see DataLoader); only the order of the
# gradient sums changes, so the losses then agree to float rounding, not bit for bit.
MAY_CHANGE_ON_RESUME = ("steps", "lr", "warmup_steps", "cooldown_steps", "grad_clip", "micro_batch_tokens",
                        "train_files", "val_files", "val_tokens", "val_every", "log_dir", "run_name", "peak_tflops",
                        "attention_backend", "loss", "compile", "save_every", "keep_checkpoints", "skip_nonfinite",
                        "dist_timeout")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_step{step:06d}.pt")


def run_checkpoints(run_dir: str) -> list:
    """The checkpoints in a run directory, oldest first; an unfinished write (.tmp) is not one."""
    found = sorted((int(m[1]), m[0]) for m in map(CHECKPOINT_NAME.fullmatch, os.listdir(run_dir)) if m)
    return [os.path.join(run_dir, name) for _, name in found]


def write_checkpoint(path: str, state: dict, keep: int):
    """Writes a temporary file and renames it into place, so a crash mid-write leaves the earlier checkpoints
    whole and nothing damaged under a checkpoint's name; then deletes all but the run's `keep` newest (0 = none).
    A write that fails (a full disk) removes its temporary file and says how much space the checkpoint needs."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # held while the file is written: remove_partial_checkpoints leaves it be
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file in its place
    except (OSError, RuntimeError) as error:  # torch.save reports a write that fails part-way as "unexpected pos"
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        run_dir = os.path.dirname(path) or "."
        raise ValueError(f"checkpoint {path}: the write failed after {written:,} bytes ({error}); the checkpoint needs "
                         f"about {state_bytes(state):,} bytes and its disk has {shutil.disk_usage(run_dir).free:,} "
                         f"free. The partial file is removed and the earlier checkpoints are whole: free space, then "
                         f"resume from {run_dir}") from error
    os.replace(tmp, path)
    if keep:
        for old in run_checkpoints(os.path.dirname(path))[:-keep]:
            os.remove(old)


def state_bytes(value) -> int:
    """The bytes of the tensors in a checkpoint's state: the size of its file, within the zip format's overhead."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    return sum(map(state_bytes, value)) if isinstance(value, (list, tuple)) else 0


PARTIAL_CHECKPOINT_NAME = re.compile(r"ckpt_step\d+\.pt\.tmp")


def remove_partial_checkpoints(run_dir: str) -> list:
    """Removes the temporary files of checkpoint writes that were killed (SIGKILL, a lost node) from run_dir, and
    returns a note on each. A write still going on holds a lock on its file (write_checkpoint), which is left."""
    notes = []
    for name in sorted(filter(PARTIAL_CHECKPOINT_NAME.fullmatch, os.listdir(run_dir))):
        path = os.path.join(run_dir, name)
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            size = os.fstat(f.fileno()).st_size
            os.remove(path)
        notes.append(f"removed {path} ({size:,} bytes): a checkpoint whose write was killed")
    return notes


def find_checkpoint(path: str, argument: str = "--resume") -> str:
    """The checkpoint `argument` names: the file itself, or a run directory's newest checkpoint."""
    if os.path.isdir(path):
        found = run_checkpoints(path)
        if not found:
            raise ValueError(f"{argument} {path}: the directory holds no checkpoint (ckpt_step*.pt); pass a run "
                             f"directory that has one, or a checkpoint file")
        return found[-1]
    if not os.path.isfile(path):
        raise ValueError(f"{argument} {path}: no such file or directory; pass a checkpoint (ckpt_step*.pt) or the "
                         f"run directory that holds it")
    return path


def load_checkpoint(path: str, argument: str = "--resume") -> dict:
    """Loads to the CPU: RNG states must be CPU tensors, and load_state_dict copies the rest to the model's device."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file fails in the zip reader, the unpickler or with EOF
        raise ValueError(f"{argument} {path}: not a readable checkpoint ({error}); pass an earlier one") from error
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= checkpoint.keys():
        raise ValueError(f"{argument} {path}: not a checkpoint written by train_gpt.py; pass a ckpt_step*.pt file")
    config = checkpoint["config"]
    if "mix_full" not in config:  # written before --mix-full, which was then --gate mix: the same model, respelled
        mixed = config["gate"] == "mix"
        checkpoint["config"] = config = {**config, "gate": "head" if mixed else config["gate"], "mix_full": mixed}
    if config.get("loss") == "auto":  # written when --loss auto took the fused loss where it could: now plain
        checkpoint["config"] = {**config, "loss": "plain"}
    return checkpoint


def check_resume(checkpoint: dict, args: Hyperparameters, train_shards: list, world_size: int) -> list:
    """Refuses to resume into a different model, batch or data, listing every difference; returns the
    deliberate changes, for the log."""
    saved, refused, changed = checkpoint["config"], [], []
    for name, value in dataclasses.asdict(args).items():
        if name == "resume" or saved.get(name) == value:  # --resume names the checkpoint, so it always differs
            continue
        difference = f"{flag(name)} {saved.get(name)!r} -> {value!r}"
        if name in MAY_CHANGE_ON_RESUME:
            changed.append(difference)
        else:
            refused.append(difference)
    if [list(shard) for shard in checkpoint["train_shards"]] != train_shards:
        old, new = checkpoint["train_shards"], train_shards
        refused.append(f"--train-files: the checkpoint read {len(old)} shard(s) ({old[0][0]} .. {old[-1][0]}), "
                       f"this run finds {len(new)} ({new[0][0]} .. {new[-1][0]}) or other sizes; point it at the "
                       f"same shards")
    if checkpoint.get("data_order") != DATA_ORDER:
        refused.append("the checkpoint was written by an earlier train_gpt.py that read the training data in another "
                       "order, so its data position cannot be continued; start a new run")
    if args.steps < checkpoint["step"]:
        refused.append(f"--steps {args.steps} ends before the checkpoint's step {checkpoint['step']}; pass more")
    if refused:
        raise ValueError(f"--resume {args.resume}: this run differs from the checkpoint (its value -> this run's) "
                         "where it must not:\n  " + "\n  ".join(refused) + "\nuse the checkpoint's values (its run's "
                         "config.json) or start a new run without --resume")
    if args.steps == checkpoint["step"]:  # resumed as it is, it would train no step and report a run of none
        raise ValueError(f"--resume {args.resume}: the run is finished, at step {checkpoint['step']} of --steps "
                         f"{args.steps}; to train it further, pass --steps M with M > {checkpoint['step']}")
    if checkpoint["world_size"] != world_size:
        changed.append(f"world size {checkpoint['world_size']} -> {world_size}")
    return changed


def restore_checkpoint(checkpoint: dict, model: GPT, optimizer, loader: DataLoader, device: torch.device):
    model.load_state_dict(checkpoint["model"])
    # this run's param groups (fused on CUDA only; lr is set every step) with the checkpoint's moments and counts
    optimizer.load_state_dict({**checkpoint["optimizer"], "param_groups": optimizer.state_dict()["param_groups"]})
    loader.seek(checkpoint["data_position"])
    torch.set_rng_state(checkpoint["rng_cpu"])
    if device.type == "cuda" and checkpoint["rng_cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng_cuda"], device)


class StopSignals:
    """SIGTERM (a scheduler's preemption, which torchrun passes on to its workers) and SIGINT (Ctrl-C) are only
    noted, so the current step finishes and the run stops after it with a checkpoint, not halfway through."""

    def __init__(self):
        self.received = 0
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}

    def _note(self, signum, frame):
        self.received = signum

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0 if none), the same on every rank, so all stop after the same step."""
        if not dist.is_initialized():
            return self.received
        received = torch.tensor(self.received, device=device)
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        return int(received.item())

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def resume_command(checkpoint: str, world_size: int) -> str:
    """The command line that continues a stopped run: the checkpoint holds its config, so --resume is enough."""
    launcher = "python" if world_size == 1 else f"torchrun --standalone --nproc_per_node={world_size}"
    return f"{launcher} {shlex.join([os.path.relpath(__file__), '--resume', checkpoint])}"


# -----------------------------------------------------------------------------
# Setup and logging


def setup_distributed(timeout_s: int):
    """(rank, local_rank, world_size, device) from torchrun's variables; one process when RANK is unset.

    A collective that waits longer than timeout_s fails (gloo raises, NCCL's watchdog ends the process), so the
    rank exits with an error and torchrun stops the others on its node: SIGTERM, which StopSignals only notes,
    then SIGKILL 30 s later."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return rank, local_rank, world_size, device


def check_config(args: Hyperparameters, world_size: int) -> int:
    """Checks flags that must agree before any work; returns the gradient accumulation steps."""
    # a NaN passes every comparison below, and a NaN or infinite --lr or --weight-decay would only show steps later
    problems = [f"{flag(f.name)} {getattr(args, f.name)}: must be a finite number" for f in fields(args)
                if isinstance(getattr(args, f.name), float) and not math.isfinite(getattr(args, f.name))]
    for name in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "mlp_hidden", "rope_base",
                 "seq_len", "batch_tokens", "micro_batch_tokens", "steps", "peak_tflops", "dist_timeout"):
        if getattr(args, name) <= 0:
            problems.append(f"{flag(name)} {getattr(args, name)}: must be positive")
    for name in ("lr", "warmup_steps", "cooldown_steps", "weight_decay", "grad_clip", "val_every", "save_every",
                 "keep_checkpoints", "skip_nonfinite"):
        if getattr(args, name) < 0:
            problems.append(f"{flag(name)} {getattr(args, name)}: must be 0 or more")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            problems.append(f"{flag(name)} {getattr(args, name)}: must lie in [0, 1)")
    if problems:  # the checks below divide by these sizes
        raise ValueError("bad configuration:\n  " + "\n  ".join(problems))
    for name, allowed in flag_choices().items():
        if getattr(args, name) not in allowed:
            problems.append(f"{flag(name)} {getattr(args, name)!r}: use one of {', '.join(allowed)}")
    if args.mix_full and args.window == 0:
        problems.append(f"--mix-full mixes a window with full causal attention: give it a --window between 1 and "
                        f"--seq-len {args.seq_len}, not 0")
    if args.mix_full and args.gate == "none":
        problems.append("--mix-full mixes by the gate: give it a --gate other than none (--gate head is the paper's)")
    if args.window < 0:
        problems.append(f"--window {args.window}: use 0 (full causal) or a positive number of tokens")
    if args.window >= args.seq_len:  # every query of a sequence sees at most seq_len keys, itself included
        problems.append(f"--window {args.window}: a window of --seq-len {args.seq_len} tokens or more is full causal "
                        f"attention; use --window 0 for that, or a window below {args.seq_len}")
    if os.path.basename(args.run_name) != args.run_name:
        problems.append(f"--run-name {args.run_name!r}: a name, not a path; pass the directory as --log-dir")
    if args.n_head % args.n_kv_head:
        problems.append(f"--n-head {args.n_head} is not a multiple of --n-kv-head {args.n_kv_head}")
    if args.head_dim % 2:
        problems.append(f"--head-dim {args.head_dim} must be even for rotary embeddings")
    if args.micro_batch_tokens % args.seq_len:
        problems.append(f"--micro-batch-tokens {args.micro_batch_tokens} is not a multiple of --seq-len {args.seq_len}")
    per_step = world_size * args.micro_batch_tokens
    if args.batch_tokens % per_step:
        problems.append(f"--batch-tokens {args.batch_tokens} is not a multiple of world size {world_size} x "
                        f"--micro-batch-tokens {args.micro_batch_tokens} = {per_step}")
    if args.val_tokens < per_step or args.val_tokens % per_step:
        problems.append(f"--val-tokens {args.val_tokens} must be a positive multiple of world size {world_size} x "
                        f"--micro-batch-tokens {args.micro_batch_tokens} = {per_step}")
    try:
        for length in eval_seq_lens(args):
            if length <= 0 or args.micro_batch_tokens % length:
                problems.append(f"--eval-seq-lens: {length} does not divide --micro-batch-tokens "
                                f"{args.micro_batch_tokens}; give lengths that do")
    except ValueError:
        problems.append(f"--eval-seq-lens {args.eval_seq_lens!r}: give comma-separated lengths in tokens, e.g. 2048,4096")
    if args.data_seed < -1:
        problems.append(f"--data-seed {args.data_seed}: use a seed of 0 or more, or -1 for --seed's")
    if args.warmup_steps + args.cooldown_steps > args.steps:
        problems.append(f"--warmup-steps {args.warmup_steps} + --cooldown-steps {args.cooldown_steps} exceed "
                        f"--steps {args.steps}")
    if problems:
        raise ValueError("bad configuration:\n  " + "\n  ".join(problems))
    return args.batch_tokens // per_step


def eval_seq_lens(args: Hyperparameters) -> list:
    """--eval-seq-lens as a list of ints (ValueError if one is not an int)."""
    return [int(length) for length in args.eval_seq_lens.split(",") if length.strip()]


def make_run_dir(log_dir: str, run_name: str) -> str:
    """A new directory logs/<run_name>-<time>[-N]; never one that exists, so no run overwrites another."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = os.path.join(log_dir, f"{run_name}-{stamp}" + (f"-{n}" if n else ""))
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
        except OSError as error:
            raise ValueError(f"--log-dir {log_dir}: cannot make a run directory in it ({error}); pass a writable "
                             f"directory") from error
    raise RuntimeError(f"could not create a new run directory under {log_dir}")


def code_sha256() -> str:
    """The sha256 of the code a run runs: this file's source, then fa4_ops.py's (the two files a run directory keeps)."""
    with open(fa4_ops.__file__, "rb") as f:
        return hashlib.sha256(code.encode() + f.read()).hexdigest()


def provenance(train_loader: DataLoader, val_loader: DataLoader) -> dict:
    """What the run ran on: the project's git commit and whether its tracked files had uncommitted changes (None
    where the code is not in a git checkout), the code's sha256 (code_sha256: also where git is not), and a
    fingerprint of each data split: its shards' names and token counts and a sha256 of all their tokens."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*command):
        try:
            done = subprocess.run(["git", "-C", here, *command], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    def fingerprint(loader):
        digest = hashlib.sha256()
        for tokens in loader.shards:
            for start in range(0, len(tokens), SHARD_CHECK_TOKENS):
                digest.update(tokens[start : start + SHARD_CHECK_TOKENS].tobytes())
        return {"shards": [[os.path.basename(f), n] for f, n in zip(loader.files, loader.shard_tokens)],
                "sha256": digest.hexdigest()}

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if commit is None or status is None else bool(status),
            "code_sha256": code_sha256(),
            "train_data": fingerprint(train_loader), "val_data": fingerprint(val_loader)}


def environment(device: torch.device, world_size: int) -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "world_size": world_size, "argv": sys.argv, "kernel_packages": {}}
    for package in ("flash-attn-4", "nvidia-cutlass-dsl", "liger-kernel"):  # the optional kernels, where installed
        try:
            env["kernel_packages"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if device.type == "cuda":
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
        except OSError:
            env["nvidia_smi"] = None
    return env


# -----------------------------------------------------------------------------
# Main: the training run


def main(argv=None):
    started = time.perf_counter()
    given = given_flags(argv)
    checkpoint = None
    if "resume" in given:  # the checkpoint's own config, with the flags given beside --resume
        path = find_checkpoint(given["resume"])
        checkpoint = load_checkpoint(path)
        args = Hyperparameters(**{**checkpoint["config"], **given, "resume": path})  # config.json names the file
    else:
        args = Hyperparameters(**given)
    # before the process group starts, which a bad flag (--dist-timeout 0) would break with a less clear error
    grad_accum_steps = check_config(args, int(os.environ.get("WORLD_SIZE", 1)))
    rank, local_rank, world_size, device = setup_distributed(args.dist_timeout)
    master = rank == 0
    B, T = args.micro_batch_tokens // args.seq_len, args.seq_len
    train_loader = DataLoader(find_shards(args.train_files, "train-files"), B, T, rank, world_size,
                              args.vocab_size, device, seed=args.seed if args.data_seed < 0 else args.data_seed)
    val_loader = DataLoader(find_shards(args.val_files, "val-files"), B, T, rank, world_size,
                            args.vocab_size, device)
    val_steps = args.val_tokens // (world_size * B * T)
    if val_loader.tokens_per_epoch < args.val_tokens + 1:
        raise ValueError(f"--val-files {args.val_files!r} holds {val_loader.tokens_per_epoch} tokens, fewer than "
                         f"--val-tokens {args.val_tokens} + 1; lower --val-tokens")
    train_shards = [[os.path.basename(f), n] for f, n in zip(train_loader.files, train_loader.shard_tokens)]
    if checkpoint is not None:
        resume_changes = check_resume(checkpoint, args, train_shards, world_size)
    cfg = ModelConfig.from_args(args)
    backend, backend_note = choose_attention_backend(args.attention_backend, cfg, device)
    loss_kernel = check_loss(args.loss, device, cfg, args.micro_batch_tokens)
    kernels = {"attention": backend, "loss": loss_kernel}

    run_dir = make_run_dir(args.log_dir, args.run_name) if master else None
    if world_size > 1:  # every rank names the same checkpoint files in its messages
        shared = [run_dir]
        dist.broadcast_object_list(shared)
        run_dir = shared[0]

    def print0(msg: str):
        if master:
            print(msg, flush=True)
            with open(os.path.join(run_dir, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def record(**metrics):
        if master:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")

    env = environment(device, world_size)
    if master:
        env["provenance"] = provenance(train_loader, val_loader)
        with open(os.path.join(run_dir, "train_gpt.py"), "w") as f:
            f.write(code)
        shutil.copy(fa4_ops.__file__, run_dir)  # the FlashAttention-4 ops this file imports
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(args), "kernels": kernels}, f, indent=2)
        with open(os.path.join(run_dir, "env.json"), "w") as f:
            json.dump(env, f, indent=2)
    print0(f"run {run_dir}: world size {world_size}, device {device}, gradient accumulation {grad_accum_steps}")
    if backend_note:
        print0(backend_note)
    print0(f"kernels: attention {kernels['attention']}, loss {kernels['loss']}")

    torch.manual_seed(args.seed)
    raw_model = GPT(cfg, loss_kernel).to(device)
    n_params = sum(p.numel() for p in raw_model.parameters())
    flops_per_token = training_flops_per_token(cfg, n_params)
    print0(f"parameters: {n_params:,}; training FLOPs per token: {flops_per_token / 1e9:.3f} G")
    model = torch.compile(raw_model, dynamic=False) if args.compile and device.type == "cuda" else raw_model
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    masks = raw_model.masks(T, device, backend)

    optimizer = make_optimizer(raw_model, args)
    start_step, train_time, skipped, last_checkpoint = 0, 0.0, 0, None
    if checkpoint is not None:
        restore_checkpoint(checkpoint, raw_model, optimizer, train_loader, device)
        start_step, train_time = checkpoint["step"], checkpoint["train_time_s"]
        skipped = checkpoint["nonfinite_skipped"]  # --skip-nonfinite counts over the whole run
        last_checkpoint = args.resume
        print0(f"resumed from {args.resume} at step {start_step}"
               + (f"; changed: {', '.join(resume_changes)}" if resume_changes else ""))
        if master:  # the run resumed from may have been killed while writing a checkpoint beside this one
            for note in remove_partial_checkpoints(os.path.dirname(args.resume) or "."):
                print0(note)
        del checkpoint  # frees the CPU copy of weights and moments

    def save_checkpoint(step: int) -> str:
        """Rank 0 writes; every rank waits for it, so none exits (or is killed with the job) while it writes."""
        path = checkpoint_path(run_dir, step)
        if master:
            state = {"step": step, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "data_position": train_loader.position, "data_order": DATA_ORDER, "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     "config": dataclasses.asdict(args), "train_shards": train_shards, "world_size": world_size,
                     "train_time_s": train_time, "nonfinite_skipped": skipped}
            write_checkpoint(path, state, args.keep_checkpoints)
            print0(f"checkpoint {path}")
        if world_size > 1:
            dist.barrier()
        return path

    # gate and sink statistics at each evaluation, on rank 0's first validation micro-batch, read once
    probe_inputs = val_loader.first_batch() if master else None
    # the first steps compile; they stay out of step time and tokens/s
    timing_skip = start_step + min(5, args.steps - start_step - 1)
    timed_time, timed_steps, val_loss, tokens_per_s, eval_time = 0.0, 0, float("nan"), float("nan"), 0.0
    tokens_per_step = args.batch_tokens
    stop, stop_signal, failure = StopSignals(), 0, None
    for step in range(start_step, args.steps + 1):
        last_step = step == args.steps
        evaluating = last_step or (args.val_every > 0 and step % args.val_every == 0)
        if evaluating and device.type == "cuda":
            torch.cuda.synchronize()  # the last step's optimizer work is not the evaluation's time
        eval_started = time.perf_counter()
        if evaluating:
            val_loss = evaluate(model, val_loader, val_steps, masks)
            print0(f"step:{step}/{args.steps} val_loss:{val_loss:.4f} train_time:{train_time:.1f}s")
            probe_started = time.perf_counter()  # evaluate and probe end on .item(): the GPU is done at each clock
            probes = probe(raw_model, probe_inputs) if master else {}  # the other ranks wait at the next step
            record(step=step, val_loss=val_loss, train_time_s=train_time, eval_s=round(probe_started - eval_started, 3),
                   probe_s=round(time.perf_counter() - probe_started, 3), **probes)
        if last_step:
            val_loss_by_seq_len, lengths_started = {str(T): val_loss}, time.perf_counter()
            for length in eval_seq_lens(args):  # the uncompiled model: each length would be a new compilation
                loader = DataLoader(val_loader.files, args.micro_batch_tokens // length, length, rank, world_size,
                                    args.vocab_size, device)
                val_loss_by_seq_len[str(length)] = evaluate(raw_model, loader, val_steps,
                                                            raw_model.masks(length, device, backend))
                print0(f"step:{step}/{args.steps} val_loss:{val_loss_by_seq_len[str(length)]:.4f} seq_len:{length}")
            if len(val_loss_by_seq_len) > 1:
                record(step=step, val_loss_by_seq_len=val_loss_by_seq_len,
                       eval_s=round(time.perf_counter() - lengths_started, 3))
        eval_time += time.perf_counter() - eval_started
        if last_step:
            break

        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loss = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            inputs, targets = train_loader.next_batch()
            if world_size > 1:
                model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
            with autocast(device):
                loss = model(inputs, targets, masks) / grad_accum_steps
            loss.backward()
            train_loss += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf"))
        if world_size > 1:
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        train_loss, grad_norm = train_loss.item(), grad_norm.item()  # the .item() also waits for the GPU
        # checked before the update, which would spread a NaN to every weight; every rank sees the same averaged
        # loss and, after DDP's all-reduce, the same gradients, so all decide alike
        finite = math.isfinite(train_loss) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_time = time.perf_counter() - t0
        train_time += step_time
        if step >= timing_skip:
            timed_time, timed_steps = timed_time + step_time, timed_steps + 1
        tokens_per_s = tokens_per_step * timed_steps / timed_time if timed_steps else tokens_per_step / step_time
        eta = (args.steps - step - 1) * (timed_time / timed_steps if timed_steps else step_time)
        print0(f"step:{step + 1}/{args.steps} loss:{train_loss:.4f} lr:{lr:.2e} grad_norm:{grad_norm:.3f} "
               f"ms:{1000 * step_time:.1f} tok/s:{tokens_per_s:,.0f} eta:{eta / 60:.1f}min")
        record(step=step + 1, train_loss=train_loss, lr=lr, grad_norm=grad_norm, step_ms=1000 * step_time)
        if not finite:
            skipped += 1
            if skipped > args.skip_nonfinite:
                where = (f"the last good checkpoint is {last_checkpoint}; resume from it" if last_checkpoint
                         else "no checkpoint was written yet; start again")
                failure = (f"step {step + 1}: loss {train_loss} or gradient norm {grad_norm} is not finite, so the "
                           f"run stopped before updating the weights with it; {where} with a lower --lr, or with "
                           f"--skip-nonfinite K to skip up to K such steps")
                break
            print0(f"step:{step + 1}/{args.steps} skipped: no update from a non-finite loss or gradient norm "
                   f"({skipped} of --skip-nonfinite {args.skip_nonfinite})")

        stop_signal = stop.agreed(device)
        if stop_signal or step + 1 == args.steps or (args.save_every and (step + 1) % args.save_every == 0):
            last_checkpoint = save_checkpoint(step + 1)
        if stop_signal:
            break
    if dist.is_initialized():
        # DDP's reducer must go before its process group: freed after it, at return, it joins gloo's worker
        # thread while holding the GIL that thread waits for, and the process never exits
        del model
        dist.destroy_process_group()
    if stop_signal:  # the handlers stay: once one rank has exited, torchrun sends SIGTERM to those still here
        print0(f"stopped by {signal.Signals(stop_signal).name} after step {step + 1}; resume with:\n"
               + resume_command(last_checkpoint, world_size))
        sys.exit(128 + stop_signal)  # the shell's code for death by this signal: the run is not finished
    stop.restore()
    if failure:
        raise FloatingPointError(failure)

    on_gpu = device.type == "cuda"  # --peak-tflops is a GPU's; on the CPU, MFU and memory are not reported
    mfu = flops_per_token * tokens_per_s / (world_size * args.peak_tflops * 1e12) if on_gpu else None
    peak_mem_gb = torch.cuda.max_memory_allocated(device) / 1e9 if on_gpu else None
    summary = {"val_loss": val_loss, "train_time_s": train_time, "tokens": args.steps * tokens_per_step,
               "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_mem_gb": peak_mem_gb, "params": n_params,
               "window": args.window, "gate": args.gate, "run_name": args.run_name, "seed": args.seed,
               "lr": args.lr, "device": env["device"], "world_size": world_size, "kernels": kernels,
               "eval_time_s": eval_time, "wall_time_s": time.perf_counter() - started}
    if len(val_loss_by_seq_len) > 1:
        summary["val_loss_by_seq_len"] = val_loss_by_seq_len
    if master:  # the data's fingerprints as their hashes alone; env.json has the shards too
        summary["provenance"] = {key: value["sha256"] if key.endswith("_data") else value
                                 for key, value in env["provenance"].items()}
    if master:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    gpu_figures = f", MFU {100 * mfu:.1f}%, peak memory {peak_mem_gb:.1f} GB" if on_gpu else ""
    print0(f"done: val_loss {val_loss:.4f}, {tokens_per_s:,.0f} tokens/s{gpu_figures}, train time {train_time:.1f}s "
           f"of {summary['wall_time_s']:.1f}s (evaluation {eval_time:.1f}s); logs in {run_dir}")
    return summary


def run_script():
    try:
        main()
    except (ValueError, FloatingPointError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    if "RANK" not in os.environ:
        run_script()
    else:
        # A torchrun worker leaves by os._exit, once its output is flushed (every file it wrote is closed): in the
        # interpreter's own teardown, gloo's threads can end the process by std::terminate, SIGABRT, after a run
        # that finished (torch 2.13, CPU ranks, a few runs in a hundred)
        exit_code = 0
        try:
            run_script()
        except SystemExit as stop:  # sys.exit's code: an int, or a message that means 1
            exit_code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            exit_code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)
