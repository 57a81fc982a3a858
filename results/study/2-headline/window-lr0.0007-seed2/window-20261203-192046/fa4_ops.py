"""
FlashAttention-4 (the optional flash-attn-4 package) as torch.library custom ops, for train_gpt.py's attention().

Apart from train_gpt.py because only a Hopper or newer GPU with flash-attn-4 installed runs them, and their plumbing
says nothing about the model. train_gpt.py imports this file, and every run directory keeps a copy of it beside
train_gpt.py's.
"""
import torch


def flash_attention_4():
    """flash_attn.cute's interface module, or the reason it cannot run here."""
    if not torch.cuda.is_available():
        return None, "no CUDA GPU"
    if torch.cuda.get_device_capability() < (9, 0):
        return None, f"{torch.cuda.get_device_name()} is older than Hopper (SM90)"
    try:
        from flash_attn.cute import interface
    except ImportError as error:
        return None, f"flash-attn-4 does not import ({error})"
    return interface, ""


# FlashAttention-4's public flash_attn_func is an autograd.Function, which a custom op cannot hold, so these two ops
# call its forward and backward functions, _flash_attn_fwd and _flash_attn_bwd, of the pinned version (README's set-up)
@torch.library.custom_op("gated_swa::fa4_forward", mutates_args=())
def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-4 on (B, T, H, D) tensors, causal, window (left, 0) (left < 0: none). An opaque op to
    torch.compile, so the compiled graph runs it as it is instead of breaking around its Python."""
    interface, _ = flash_attention_4()
    out, lse, *_ = interface._flash_attn_fwd(q, k, v, causal=True, window_size_left=None if left < 0 else left,
                                             window_size_right=0, return_lse=True)
    return out, lse


@fa4_forward.register_fake
def _(q, k, v, left):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("gated_swa::fa4_backward", mutates_args=())
def fa4_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
                 lse: torch.Tensor, left: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    interface, _ = flash_attention_4()
    dq, dk, dv = interface._flash_attn_bwd(q, k, v, out, grad_out, lse, causal=True,
                                           window_size_left=None if left < 0 else left, window_size_right=0)
    return dq, dk, dv


@fa4_backward.register_fake
def _(q, k, v, out, grad_out, lse, left):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup_context(ctx, inputs, output):
    q, k, v, ctx.left = inputs
    ctx.save_for_backward(q, k, v, *output)


def _fa4_grads(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return *fa4_backward(q, k, v, out, grad_out.contiguous(), lse, ctx.left), None


fa4_forward.register_autograd(_fa4_grads, setup_context=_fa4_setup_context)
