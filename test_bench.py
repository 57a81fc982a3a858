"""bench.py's CPU-testable parts: which kind of work a profiled CUDA kernel is, and that its training step is
train_gpt.py's (its timings need a GPU).

    python -m pytest -q test_bench.py
"""
import pytest
import torch

import bench
import train_gpt as tg


@pytest.mark.parametrize("name, kind", [  # kernel names from profiled gated steps (H200, torch 2.11)
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at__tensor0000o1", "attention"),
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_postprocessFlashAttentionBackwardPostprocess_object_at", "attention"),
    ("liger_cross_entropy_kernel", "loss"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matrix products"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_256x128_32x3_nn_align2>(cutlass_80_tensorop_bf1",
     "matrix products"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, false, float, __nv",
     "matrix products"),
    ("triton_tem_fused_flex_attention_backward_mul_sigmoid_transpose_unsqueeze_view_11", "attention"),
    ("triton_per_fused__to_copy_flex_attention_backward_mul_sigmoid_sigmoid_backward_squeeze_sum_transpose", "attention"),
    ("triton_tem_fused_mm_0", "matrix products"),  # inductor's own matrix product, as under max-autotune
    ("triton_red_fused__log_softmax__to_copy__unsafe_view_prepare_softmax_online_view_19", "elementwise and reductions"),
    ("triton_poi_fused__unsafe_view_mul_silu_silu_backward_view_4", "elementwise and reductions"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::FusedOpti",
     "optimizer"),
    ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float, at::native::func_wrapper_t<float", "other"),
])
def test_kernel_kind(name, kind):
    assert bench.kernel_kind(name) == kind


def test_the_step_table_trains_with_train_gpts_optimizer(monkeypatch):
    """bench.py's step runs train_gpt.py's make_optimizer (its weight-decay groups) on the model the flags describe;
    here on the CPU, uncompiled, with a tiny gated model."""
    made, make_optimizer = [], tg.make_optimizer

    def record(model, args):
        made.append(make_optimizer(model, args))
        return made[-1]

    monkeypatch.setattr(bench.torch, "compile", lambda model, **options: model)
    monkeypatch.setattr(bench.tg, "make_optimizer", record)
    args = tg.Hyperparameters(n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16, mlp_hidden=64, seq_len=32,
                              micro_batch_tokens=64, window=8, gate="head", weight_decay=0.2)
    step, _ = bench.build_step(args, "sdpa", torch.device("cpu"))
    step()
    (optimizer,) = made
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.2, 0.0]
    assert all(optimizer.state[p]["step"] == 1 for group in optimizer.param_groups for p in group["params"])
