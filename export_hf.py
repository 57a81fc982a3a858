"""
Export a train_gpt.py checkpoint as a Hugging Face transformers Qwen3 model, with GPT-2's tokenizer files.

    python export_hf.py logs/run-20261127-120000 hf/run          # a run directory's newest checkpoint
    python export_hf.py logs/run-.../ckpt_step005000.pt hf/run   # or one checkpoint
    python export_hf.py logs/run-20261127-130000 hf/run --force  # replaces the export already in hf/run

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("hf/run")                            # none: a Qwen3ForCausalLM
    model = AutoModelForCausalLM.from_pretrained("hf/run", trust_remote_code=True)    # --gate head

train_gpt.py's model is Qwen3's architecture with tied embeddings, so the weights map one to one (WEIGHT_NAMES).
A window-only model (--window W) becomes a Qwen3 model whose every layer is a "sliding_attention" layer with
sliding_window W: transformers lets key j reach query i iff 0 <= i - j < W, as train_gpt.py's
sliding_window_mask does. Stock Qwen3 has no head gate, so a gated model (--gate head) gets model type
"gated_qwen3": its folder also holds modeling_gated_qwen3.py (Qwen3 with the gate), which config.json's
auto_map names, and its gates are model.layers.{i}.self_attn.gate.weight and .bias. --mix-full is refused.
GPT-2's tokenizer files (vocab.json, merges.txt, tokenizer_config.json) are made from data/gpt2.tiktoken.
"""
import argparse
import json
import os
import shutil
import struct
import sys

import torch

from sample import gpt2_encoding
from train_gpt import BOS_ID, Hyperparameters, ModelConfig, find_checkpoint, load_checkpoint

# train_gpt.py parameter name -> transformers Qwen3ForCausalLM name; {i} is the layer. The output layer is
# tied to the embedding (tie_word_embeddings), so lm_head.weight is not stored.
WEIGHT_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "blocks.{i}.input_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"blocks.{{i}}.attn.{name}.weight": f"model.layers.{{i}}.self_attn.{name}.weight"
       for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")},
    **{f"blocks.{{i}}.mlp.{name}.weight": f"model.layers.{{i}}.mlp.{name}.weight"
       for name in ("gate_proj", "up_proj", "down_proj")},
    # the head gate (--gate head): not part of Qwen3, but of GatedQwen3Attention in modeling_gated_qwen3.py
    "blocks.{i}.attn.gate.weight": "model.layers.{i}.self_attn.gate.weight",
    "blocks.{i}.attn.gate.bias": "model.layers.{i}.self_attn.gate.bias",
}


def hf_state_dict(state: dict, n_layer: int) -> dict:
    """Renames a GPT state dict to Qwen3ForCausalLM's names; every tensor must have a name."""
    names = {}
    for ours, theirs in WEIGHT_NAMES.items():
        for i in range(n_layer) if "{i}" in ours else [None]:
            names[ours.format(i=i)] = theirs.format(i=i)
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(f"the checkpoint holds weights with no Hugging Face name: {', '.join(unknown)}; "
                         f"add them to WEIGHT_NAMES in export_hf.py")
    return {names[name]: tensor for name, tensor in state.items()}


# the gates GatedQwen3Attention computes: one per head (started at 0.5 or near 1, with or without b_g), and the
# controls const and scalar, which are the head gate with W_g = 0 (and b_g = 0 for const: sigmoid(0) = 0.5)
HEAD_GATES = ("head", "head-open", "head-nobias", "const", "scalar")
# a gated model's own model class, copied beside its weights; its classes keep their names in auto_map
GATED_MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling_gated_qwen3.py")


# the files export writes: a folder holding only these is an export, which --force may replace
EXPORT_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                os.path.basename(GATED_MODELING_FILE))


def clear_out_dir(out_dir: str, force: bool):
    """Makes sure out_dir is new or empty, so that an export never mixes with another one's files (a baseline's
    weights beside a gated model's code would load as the wrong model). A folder that is not empty is refused; with
    force, an earlier export's files are removed, and nothing else ever is."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: a file, not a folder; pass a folder for the export")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if entries and not force:
        raise ValueError(f"{out_dir}: the folder is not empty (it holds {', '.join(entries)}); pass a new or empty "
                         f"folder, or --force to replace the export in it")
    others = [name for name in entries if name not in EXPORT_FILES or not os.path.isfile(os.path.join(out_dir, name))]
    if others:
        raise ValueError(f"{out_dir}: --force replaces an earlier export only, and the folder also holds "
                         f"{', '.join(others)}; move those out or pass another folder")
    for name in entries:
        os.remove(os.path.join(out_dir, name))


def hf_config(cfg: ModelConfig) -> dict:
    """Qwen3Config fields (transformers 5.x) for a train_gpt.py model."""
    window = cfg.window
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,  # Qwen3's attention scales by head_dim ** -0.5, as SDPA does for us
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,  # the training length; rotary itself has no limit
        "rms_norm_eps": 1e-6,  # nn.RMSNorm's eps in train_gpt.py
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,  # GPT-2's <|endoftext|> starts and ends every document
        "eos_token_id": BOS_ID,
        "dtype": "float32",
        # Qwen3 keeps sliding_window only with use_sliding_window; layer_types names each layer's mask
        "use_sliding_window": window > 0,
        "sliding_window": window if window > 0 else None,
        "max_window_layers": 0,
        "layer_types": [("sliding_attention" if window > 0 else "full_attention")] * cfg.n_layer,
    }
    if cfg.gate in HEAD_GATES:
        # GatedQwen3Config's model type, so that transformers refuses the folder without trust_remote_code rather
        # than compute the model with no gates
        module = os.path.splitext(os.path.basename(GATED_MODELING_FILE))[0]
        config["architectures"] = ["GatedQwen3ForCausalLM"]
        config["model_type"] = "gated_qwen3"
        config["auto_map"] = {"AutoConfig": f"{module}.GatedQwen3Config",
                              "AutoModelForCausalLM": f"{module}.GatedQwen3ForCausalLM"}
    return config


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None):
    """Writes tensors in the safetensors format (Hugging Face's safetensors documentation, "Format"):
    an unsigned little-endian 64-bit header length N, N bytes of JSON mapping each name to its dtype, shape and
    [begin, end) byte offsets into the data that follows (plus an optional "__metadata__" of strings), then
    the raw little-endian tensor bytes, in order. Everything is stored as float32 ("F32")."""
    header, arrays, offset = {}, [], 0
    for name, tensor in tensors.items():
        array = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the spec allows trailing spaces; they align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for array in arrays:
            f.write(array.tobytes())


def gpt2_byte_chars() -> dict:
    """GPT-2's vocab.json spells each byte as a printable character: the printable Latin-1 bytes as themselves,
    the other 68 (controls, space, ...) as chr(256), chr(257), ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def bpe_split(token: bytes, ranks: dict) -> list:
    """The two tokens whose merge made token: BPE on its bytes with only the merges ranked before it."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def write_gpt2_tokenizer(out_dir: str, max_length: int):
    """vocab.json, merges.txt and tokenizer_config.json for transformers' GPT2Tokenizer, made from the shipped
    tiktoken ranks (data/gpt2.tiktoken): a token's rank is its id, and the merges, in rank order, are recovered
    by splitting each token of two or more bytes with the merges ranked before it."""
    ranks = gpt2_encoding()._mergeable_ranks
    chars = gpt2_byte_chars()
    spell = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = BOS_ID
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = bpe_split(token, ranks)
            assert len(parts) == 2, f"token {token!r} is not one merge of earlier tokens: {parts}"
            merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "add_prefix_space": False, "model_max_length": max_length}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export(checkpoint_path: str, out_dir: str, force: bool = False) -> dict:
    """Writes config.json, model.safetensors and GPT-2's tokenizer files into out_dir, a new or empty folder (with
    force, one that holds an earlier export, which is replaced), and for a gated model modeling_gated_qwen3.py;
    returns the config. A write that fails removes what it wrote."""
    path = find_checkpoint(checkpoint_path, "checkpoint")
    checkpoint = load_checkpoint(path, "checkpoint")
    args = Hyperparameters(**checkpoint["config"])
    if args.mix_full:
        raise ValueError(f"{path}: a --mix-full model runs two attention passes per layer, which Qwen3 has no "
                         f"place for; export a model without --mix-full, or sample it with sample.py")
    if args.gate not in ("none", *HEAD_GATES):
        raise ValueError(f"{path}: a --gate {args.gate} model has a gate per channel, which modeling_gated_qwen3.py "
                         f"does not have; export a none or head model, or sample it with sample.py")
    cfg = ModelConfig.from_args(args)
    config = hf_config(cfg)
    state = dict(checkpoint["model"])
    for i in range(cfg.n_layer):  # the head gate's layout: a zero bias is no bias, a zero W_g no input
        if cfg.gate in ("head-nobias", "const"):
            state[f"blocks.{i}.attn.gate.bias"] = torch.zeros(cfg.n_head)
        if cfg.gate in ("const", "scalar"):
            state[f"blocks.{i}.attn.gate.weight"] = torch.zeros(cfg.n_head, cfg.d_model)
    tensors = hf_state_dict(state, cfg.n_layer)
    clear_out_dir(out_dir, force)
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors,
                          {"format": "pt", "source": os.path.basename(path), "step": str(checkpoint["step"])})
        write_gpt2_tokenizer(out_dir, cfg.seq_len)
        if cfg.gate in HEAD_GATES:
            shutil.copyfile(GATED_MODELING_FILE, os.path.join(out_dir, os.path.basename(GATED_MODELING_FILE)))
    except OSError as error:  # the folder held no files before (clear_out_dir), so every export file in it is ours
        for name in EXPORT_FILES:
            if os.path.isfile(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        raise ValueError(f"{out_dir}: cannot write the export there ({error}); pass a folder you can write to, with "
                         f"room for it") from error
    attention = f"sliding window {args.window}" if args.window > 0 else "full causal"
    print(f"exported {path} (step {checkpoint['step']}, {attention}, gate {args.gate}) to {out_dir}")
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a ckpt_step*.pt file, or a run directory (its newest checkpoint)")
    parser.add_argument("out_dir", help="the folder to write the model and tokenizer files into: new or empty")
    parser.add_argument("--force", action="store_true",
                        help="replace the export already in out_dir (only a folder of an export's files)")
    args = parser.parse_args(argv)
    export(args.checkpoint, args.out_dir, args.force)


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
