"""
Generate text with a train_gpt.py checkpoint: its window and gates as trained, GPT-2's BPE to encode and decode.

    python sample.py logs/run-20261127-120000 --prompt "It is a truth universally acknowledged"
    python sample.py logs/run-.../ckpt_step005000.pt --prompt "..." --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 1
    python sample.py logs/run-... --prompt "..." --temperature 0        # greedy

The prompt follows <|endoftext|>, as every training document does. No KV cache: each new token reruns the model
over the context (the last seq_len tokens, the longest the model was trained on), with a dense mask for SDPA,
which works alike on the CPU and the GPU and never recompiles.
"""
import argparse
import importlib.util
import math
import os
import sys
import time

import torch

from train_gpt import BOS_ID, GPT, Hyperparameters, ModelConfig, autocast, find_checkpoint, load_checkpoint


def gpt2_encoding():
    """data/fineweb.py's offline GPT-2 encoding, loaded from its path (data/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fineweb.py")
    spec = importlib.util.spec_from_file_location("fineweb", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gpt2_encoding()


def load_model(checkpoint_path: str, device: torch.device):
    """The checkpoint's model in eval mode."""
    checkpoint = load_checkpoint(find_checkpoint(checkpoint_path, "checkpoint"), "checkpoint")
    args = Hyperparameters(**checkpoint["config"])
    model = GPT(ModelConfig.from_args(args))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


@torch.no_grad()
def generate(model: GPT, ids: list, max_new_tokens: int, temperature: float, top_k: int,
             vocab: int, generator: torch.Generator) -> list:
    """The ids of max_new_tokens tokens after ids. Greedy for temperature 0, else sampled from
    softmax(logits / temperature) over the top_k most likely (all when top_k is 0). Only ids < vocab (the
    tokenizer's) are chosen: the padded rows of the embedding are never trained."""
    device = model.embed.weight.device
    context = torch.tensor(ids, dtype=torch.long, device=device)
    new = []
    for _ in range(max_new_tokens):
        context = context[-model.cfg.seq_len:]  # the model's rotary tables end at seq_len
        with autocast(device):  # dense masks: the context's length changes every token
            logits = model.logits(context[None], model.masks(len(context), device))
        logits = logits[0, -1, :vocab].float()
        if temperature == 0:
            token = logits.argmax()
        else:
            logits = logits / temperature
            if 0 < top_k < vocab:
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[0]
        context = torch.cat((context, token.view(1)))
        new.append(int(token))
    return new


def main(argv=None) -> list:
    """Prints the prompt and its continuation, then tokens/s; returns the new token ids."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a ckpt_step*.pt file, or a run directory (its newest checkpoint)")
    parser.add_argument("--prompt", default="", help="text to continue; empty starts a new document")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; below 1 is more conservative")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "temperature", "top_k"):
        if not 0 <= getattr(args, name) < math.inf:  # a NaN fails the comparison too
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a finite number, 0 or more")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"--device {args.device}: use cpu, or cuda on a machine with a CUDA GPU")
    device = torch.device(args.device)
    model = load_model(args.checkpoint, device)
    encoding = gpt2_encoding()
    ids = [BOS_ID] + encoding.encode_ordinary(args.prompt)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    new = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k,
                   min(encoding.n_vocab, model.cfg.vocab_size), generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    print(args.prompt + encoding.decode(new))
    print(f"{len(new)} tokens in {seconds:.2f}s: {len(new) / max(seconds, 1e-9):.1f} tokens/s on {device}",
          file=sys.stderr)
    return new


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
