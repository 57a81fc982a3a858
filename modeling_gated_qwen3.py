"""
Qwen3 with a learned sigmoid gate per head and token on the attention output: train_gpt.py's --gate head.

export_hf.py copies this file beside a gated model's weights, and config.json's auto_map points AutoConfig and
AutoModelForCausalLM here, so transformers builds this model from the folder:

    AutoModelForCausalLM.from_pretrained("hf/run", trust_remote_code=True)

In every layer, head h's attention output at token t is multiplied by g[t, h] = sigmoid(W_g x[t] + b_g)[h] before
o_proj, x being the attention's normed input (what q_proj, k_proj and v_proj see). W_g and b_g are stored as
model.layers.{i}.self_attn.gate.weight (heads x width) and .bias (heads). Everything else, the sliding window and
the KV cache included, is transformers' Qwen3. The file imports only torch and transformers, since it travels
alone with the weights.
"""
import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention


class GatedQwen3Config(Qwen3Config):
    # A model type of our own: transformers without trust_remote_code refuses the folder, where "qwen3" would load it
    # and silently compute the model with every gate left out
    model_type = "gated_qwen3"


class HeadGatedLinear(nn.Linear):
    """o_proj that first multiplies each head's slice of its input by that head's gate, set by the attention."""

    gates = None  # (B, T, H) during GatedQwen3Attention.forward

    def forward(self, y):
        B, T, _ = y.shape
        y = y.view(B, T, self.gates.size(-1), -1) * self.gates.unsqueeze(-1)  # B, T, H, D
        return super().forward(y.view(B, T, -1))


class GatedQwen3Attention(Qwen3Attention):
    def __init__(self, config: GatedQwen3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.gate = nn.Linear(config.hidden_size, config.num_attention_heads, bias=True)
        self.o_proj = HeadGatedLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                      bias=config.attention_bias)

    def forward(self, hidden_states, *args, **kwargs):
        # Qwen3's forward runs unchanged and the gates reach o_proj through an attribute, rather than a copy of its
        # body here: its arguments (the cache's among them) differ between transformers versions
        self.o_proj.gates = torch.sigmoid(self.gate(hidden_states))  # B, T, H
        output = super().forward(hidden_states, *args, **kwargs)
        self.o_proj.gates = None  # so no step's gates, or their autograd graph, outlive it
        return output


class GatedQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = GatedQwen3Config

    def __init__(self, config: GatedQwen3Config):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = GatedQwen3Attention(config, i)
        self.post_init()  # again, so that the gates too are initialised when the model is not loaded from weights
