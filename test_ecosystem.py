"""Export to Hugging Face transformers (export_hf.py) and sampling (sample.py), on tiny random or briefly trained
models, on the CPU.

    python -m pytest -q test_ecosystem.py

The transformers tests are skipped when transformers is not installed.
"""
import ast
import dataclasses
import glob
import io
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import export_hf
import sample
import train_gpt as tg
from test_train import HERE, SAMPLE_TRAIN, SAMPLE_VAL, only_run_dir

CPU = torch.device("cpu")
TINY = dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, mlp_hidden=128, seq_len=64)
WINDOW = 8
PROMPT = "It is a truth universally acknowledged"
VOCAB = tg.Hyperparameters().vocab_size  # the padded vocabulary the tiny models keep
ARMS = [(0, "none"), (WINDOW, "none"), (0, "head"), (WINDOW, "head")]  # (window, gate): baseline, window, gate, both
GATE_VARIANTS = [(WINDOW, g) for g in ("head-nobias", "head-open", "const", "scalar")]  # exported as the head gate


def make_checkpoint(path, **flags):
    """A checkpoint in train_gpt.py's format of a tiny model with random weights (norms and gates included,
    so a swapped or dropped weight changes the logits); returns the model and its Hyperparameters."""
    args = tg.Hyperparameters(**TINY, **flags)
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_args(args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = {"step": 2, "model": model.state_dict(), "optimizer": {}, "data_position": 0,
             "rng_cpu": torch.get_rng_state(), "rng_cuda": None, "config": dataclasses.asdict(args),
             "train_shards": [], "world_size": 1, "train_time_s": 0.0, "nonfinite_skipped": 0}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return model.eval(), args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(window, gate): the run directory of the tiny model trained for 20 steps of 256 tokens on the Austen
    sample (a few seconds), which moves its gates off 0.5; each arm is trained once per module."""
    runs = {}

    def run_dir(window, gate):
        if (window, gate) not in runs:
            log_dir = tmp_path_factory.mktemp(f"trained-{window}-{gate}")
            tg.main(["--train-files", SAMPLE_TRAIN, "--val-files", SAMPLE_VAL, "--log-dir", str(log_dir),
                     *[str(x) for name, value in TINY.items() for x in (tg.flag(name), value)],
                     "--batch-tokens", "256", "--micro-batch-tokens", "256", "--val-tokens", "256", "--val-every", "0",
                     "--steps", "20", "--warmup-steps", "2", "--cooldown-steps", "4", "--lr", "1e-2",
                     "--compile", "false", "--window", str(window), "--gate", gate])
            runs[window, gate] = only_run_dir(log_dir)
        return runs[window, gate]

    return run_dir


@pytest.fixture(scope="module")
def tokenizer_files():
    """{max_length: the folder where export_hf.write_gpt2_tokenizer wrote its files}, filled by tokenizer_made_once."""
    return {}


@pytest.fixture
def tokenizer_made_once(monkeypatch, tokenizer_files, tmp_path_factory):
    """export_hf.export writes GPT-2's tokenizer files by recovering the 50,000 merges from the tiktoken ranks, about
    4 s each time; they depend on nothing but data/gpt2.tiktoken and the model's seq_len. For a test that exports
    and does not test the tokenizer, the first export (in this module) runs write_gpt2_tokenizer itself, and later
    ones copy its files, byte for byte what it writes. test_exported_tokenizer_matches_tiktoken runs it itself."""
    write = export_hf.write_gpt2_tokenizer

    def write_once(out_dir, max_length):
        if max_length not in tokenizer_files:
            folder = tmp_path_factory.mktemp(f"tokenizer-{max_length}")
            write(str(folder), max_length)
            tokenizer_files[max_length] = folder
        for name in sorted(os.listdir(tokenizer_files[max_length])):
            shutil.copyfile(tokenizer_files[max_length] / name, os.path.join(out_dir, name))

    monkeypatch.setattr(export_hf, "write_gpt2_tokenizer", write_once)


def our_logits(model, window, idx):
    """model's logits with the visibility of this window (its own or another)."""
    mask = tg.build_mask(tg.sliding_window_mask(tg.ModelConfig(window=window)), idx.size(1), CPU, "sdpa")
    with torch.no_grad():
        return model.logits(idx, tg.AttentionMasks(mask))


def read_safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def test_safetensors_layout(tmp_path):
    """Header length, JSON offsets and little-endian float32 bytes as the format describes."""
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([-1.5])}
    path = tmp_path / "t.safetensors"
    export_hf.write_safetensors(path, tensors, {"format": "pt"})
    header, start = read_safetensors_header(path)
    assert start % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    data = path.read_bytes()[start:]
    for name, tensor in tensors.items():
        info = header[name]
        assert info["dtype"] == "F32" and info["shape"] == list(tensor.shape)
        begin, end = info["data_offsets"]
        assert np.array_equal(np.frombuffer(data[begin:end], dtype="<f4").reshape(tensor.shape), tensor.numpy())
    assert len(data) == header["b"]["data_offsets"][1]


@pytest.mark.usefixtures("tokenizer_made_once")
def test_export_names_every_weight_and_the_window(tmp_path):
    model, _ = make_checkpoint(str(tmp_path / "run" / "ckpt_step000002.pt"), window=WINDOW, gate="head")
    config = export_hf.export(str(tmp_path / "run"), str(tmp_path / "hf"))  # a run directory: its newest checkpoint
    header, _ = read_safetensors_header(tmp_path / "hf" / "model.safetensors")
    assert len(header) - 1 == len(model.state_dict())  # one per weight, plus __metadata__
    for i in range(TINY["n_layer"]):
        assert header[f"model.layers.{i}.self_attn.gate.weight"]["shape"] == [TINY["n_head"], TINY["d_model"]]
        assert header[f"model.layers.{i}.self_attn.gate.bias"]["shape"] == [TINY["n_head"]]
    assert "lm_head.weight" not in header and config["tie_word_embeddings"]
    assert config["sliding_window"] == WINDOW and config["use_sliding_window"]
    assert config["layer_types"] == ["sliding_attention"] * TINY["n_layer"]
    assert config["model_type"] == "gated_qwen3" and config["architectures"] == ["GatedQwen3ForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_gated_qwen3.GatedQwen3Config",
                                  "AutoModelForCausalLM": "modeling_gated_qwen3.GatedQwen3ForCausalLM"}
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == config
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "modeling_gated_qwen3.py"):
        assert (tmp_path / "hf" / name).exists()
    # it travels alone with the weights, so it may import nothing but torch and transformers
    tree = ast.parse((tmp_path / "hf" / "modeling_gated_qwen3.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in modules} == {"torch", "transformers"}


def folder(path):
    """The files of a folder and their bytes."""
    return {name: (path / name).read_bytes() for name in os.listdir(path) if (path / name).is_file()}


@pytest.mark.usefixtures("tokenizer_made_once")
def test_export_refuses_a_folder_that_is_not_empty_and_force_replaces_only_an_export(tmp_path):
    """A baseline exported over a gated export is refused with the folder untouched (it would leave the gated
    model's code beside the baseline's weights); --force replaces the export; --force never removes anything but an
    export's files, and a file or an unusable path for the folder is one clear error."""
    make_checkpoint(str(tmp_path / "gated.pt"), window=WINDOW, gate="head")
    make_checkpoint(str(tmp_path / "baseline.pt"))
    hf = tmp_path / "hf"
    export_hf.export(str(tmp_path / "gated.pt"), str(hf))
    gated = folder(hf)
    with pytest.raises(ValueError, match=rf"^{hf}: the folder is not empty \(it holds config.json, merges.txt, "
                                         r"model.safetensors, modeling_gated_qwen3.py, tokenizer_config.json, "
                                         r"vocab.json\); pass a new or empty folder, or --force to replace the export"):
        export_hf.export(str(tmp_path / "baseline.pt"), str(hf))
    assert folder(hf) == gated
    config = export_hf.export(str(tmp_path / "baseline.pt"), str(hf), force=True)
    assert config["model_type"] == "qwen3" and "modeling_gated_qwen3.py" not in os.listdir(hf)
    assert json.loads((hf / "config.json").read_text()) == config

    (hf / "README.md").write_text("the user's model card")
    (hf / "extra").mkdir()
    baseline = folder(hf)
    with pytest.raises(ValueError, match=rf"^{hf}: --force replaces an earlier export only, and the folder also holds "
                                         r"README.md, extra; move those out or pass another folder$"):
        export_hf.export(str(tmp_path / "gated.pt"), str(hf), force=True)
    assert folder(hf) == baseline and (hf / "extra").is_dir()
    with pytest.raises(ValueError, match="--force replaces an earlier export only"):
        export_hf.export(str(tmp_path / "gated.pt"), "/", force=True)

    (tmp_path / "a_file").write_text("the user's")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'a_file'}: a file, not a folder; pass a folder for the export$"):
        export_hf.export(str(tmp_path / "gated.pt"), str(tmp_path / "a_file"), force=True)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'a_file' / 'hf'}: cannot write the export there \(.*\); pass "
                                         r"a folder you can write to"):
        export_hf.export(str(tmp_path / "gated.pt"), str(tmp_path / "a_file" / "hf"))
    assert (tmp_path / "a_file").read_text() == "the user's"
    done = subprocess.run([sys.executable, os.path.join(HERE, "export_hf.py"), str(tmp_path / "gated.pt"),
                           str(tmp_path / "a_file")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == f"error: {tmp_path / 'a_file'}: a file, not a folder; pass a folder " \
                                                   f"for the export\n"


@pytest.mark.usefixtures("tokenizer_made_once")
def test_ungated_export_is_plain_qwen3(tmp_path):
    """A window-only model needs no code of ours: model type qwen3, no auto_map, no modeling file."""
    make_checkpoint(str(tmp_path / "ckpt.pt"), window=WINDOW)
    config = export_hf.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert "auto_map" not in config and not (tmp_path / "hf" / "modeling_gated_qwen3.py").exists()


def load_hf(path, attn_implementation, trust_remote_code=False):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation,
                                                              dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model.eval()


@pytest.mark.usefixtures("tokenizer_made_once")
@pytest.mark.parametrize("window, gate", ARMS + GATE_VARIANTS)
def test_transformers_logits_match(tmp_path, trained, window, gate):
    """Trained baseline, window-only, gate-only and gated window models: transformers (Qwen3, or modeling_gated_qwen3.py
    for a gated model) gives train_gpt.py's logits, in eager and sdpa attention, on validation text 5 windows long
    (on text, unlike random ids, the briefly trained attention matters); a window one token shorter or longer, or
    every gate at its initial 0.5, would not."""
    run_dir = trained(window, gate)
    model = sample.load_model(run_dir, CPU)
    export_hf.export(run_dir, str(tmp_path / "hf"))
    text = tg.load_shard(sorted(glob.glob(SAMPLE_VAL))[0], VOCAB)[:2 * 5 * WINDOW]
    idx = torch.tensor(text.astype(np.int64)).view(2, 5 * WINDOW)
    ours = our_logits(model, window, idx)
    for attn_implementation in ("eager", "sdpa"):
        hf = load_hf(str(tmp_path / "hf"), attn_implementation, trust_remote_code=gate != "none")
        assert type(hf).__name__ == ("GatedQwen3ForCausalLM" if gate != "none" else "Qwen3ForCausalLM")
        with torch.no_grad():
            theirs = hf(idx).logits
        difference = (ours - theirs).abs().max().item()
        print(f"window {window}, gate {gate}, {attn_implementation}: max abs logit difference {difference:.2e}")
        assert difference < 1e-4
    if window:
        for other in (window - 1, window + 1):
            assert (our_logits(model, other, idx) - theirs).abs().max() > 1e-2
    if gate == "head":
        with torch.no_grad():
            for block in model.blocks:
                block.attn.gate.weight.zero_()
                block.attn.gate.bias.zero_()
        assert (our_logits(model, window, idx) - theirs).abs().max() > 1e-2


@pytest.mark.usefixtures("tokenizer_made_once")
def test_transformers_refuses_a_gated_model_without_trust_remote_code(tmp_path, monkeypatch):
    """Without trust_remote_code, transformers' own error (after its prompt, answered with the default "no"), not a
    Qwen3 model without gates; the tokenizer still loads."""
    transformers = pytest.importorskip("transformers")
    make_checkpoint(str(tmp_path / "ckpt.pt"), window=WINDOW, gate="head")
    export_hf.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    for kwargs in ({}, {"trust_remote_code": False}):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    assert tokenizer("It is")["input_ids"] == sample.gpt2_encoding().encode_ordinary("It is")


def test_exported_tokenizer_matches_tiktoken(tmp_path):
    """The GPT-2 tokenizer files made from data/gpt2.tiktoken encode and decode as tiktoken's GPT-2 does."""
    transformers = pytest.importorskip("transformers")
    make_checkpoint(str(tmp_path / "ckpt.pt"))
    export_hf.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    assert len((tmp_path / "hf" / "merges.txt").read_text().splitlines()) == 1 + 50000  # GPT-2's merges
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    encoding = sample.gpt2_encoding()
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for text in (readme, "  Hello,\tworld!\n\n  h\u00e9llo \u65e5\u672c\u8a9e<|endoftext|>it's  \x00 ", " \n"):
        ids = encoding.encode(text, allowed_special="all")
        assert tokenizer(text)["input_ids"] == ids
        assert tokenizer.decode(ids) == text


def greedy_by_hand(model, window, ids, n):
    ids = list(ids)
    for _ in range(n):
        context = torch.tensor(ids[-TINY["seq_len"]:])[None]
        ids.append(int(our_logits(model, window, context)[0, -1, :50257].argmax()))
    return ids[-n:]


def test_greedy_sampling_equals_greedy_by_hand(tmp_path):
    """Window and gates as trained; 80 new tokens run the context past seq_len, so it is cropped."""
    model, _ = make_checkpoint(str(tmp_path / "ckpt.pt"), window=WINDOW, gate="head")
    new = sample.main([str(tmp_path / "ckpt.pt"), "--prompt", PROMPT, "--max-new-tokens", "80", "--temperature", "0"])
    prompt = [tg.BOS_ID] + sample.gpt2_encoding().encode_ordinary(PROMPT)
    assert new == greedy_by_hand(model, WINDOW, prompt, 80)


@pytest.mark.usefixtures("tokenizer_made_once")
@pytest.mark.parametrize("gate", ["none", "head"])
def test_transformers_generate_equals_greedy_sampling(tmp_path, trained, gate):
    """transformers' greedy generate (with its KV cache and sliding window, and for a gated model the gates) continues
    a prompt past the window as sample.py does, within seq_len, where sample.py does not crop."""
    run_dir = trained(WINDOW, gate)
    export_hf.export(run_dir, str(tmp_path / "hf"))
    hf = load_hf(str(tmp_path / "hf"), "sdpa", trust_remote_code=gate == "head")
    new = sample.main([run_dir, "--prompt", PROMPT, "--max-new-tokens", "30", "--temperature", "0"])
    prompt = torch.tensor([[tg.BOS_ID] + sample.gpt2_encoding().encode_ordinary(PROMPT)])
    hf.generation_config.pad_token_id = tg.BOS_ID
    out = hf.generate(prompt, max_new_tokens=30, do_sample=False, suppress_tokens=list(range(50257, 50304)))
    assert out[0, prompt.size(1):].tolist() == new


@pytest.mark.parametrize("flags, refusal", [
    ({"gate": "head", "mix_full": True}, "a --mix-full model runs two attention passes per layer"),
    ({"gate": "channel"}, "a --gate channel model has a gate per channel")])
def test_mix_full_and_channel_gates_sample_but_are_not_exported(tmp_path, flags, refusal):
    """sample.py runs both passes of --mix-full, and a gate per channel (greedy equals the argmax of the model's own
    logits); export_hf.py refuses both, naming the flag: Qwen3 has one attention per layer, and
    modeling_gated_qwen3.py one gate per head."""
    model, _ = make_checkpoint(str(tmp_path / "ckpt.pt"), window=WINDOW, **flags)
    new = sample.main([str(tmp_path / "ckpt.pt"), "--prompt", PROMPT, "--max-new-tokens", "3", "--temperature", "0"])
    ids = torch.tensor([[tg.BOS_ID] + sample.gpt2_encoding().encode_ordinary(PROMPT)])
    with torch.no_grad():
        logits = model.logits(ids, model.masks(ids.size(1), CPU))
    assert new[0] == int(logits[0, -1, :50257].argmax())
    with pytest.raises(ValueError, match=refusal):
        export_hf.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_of_gate_mix_loads_as_mix_full(tmp_path):
    """A checkpoint from before --mix-full, when the same model was --gate mix, loads as --gate head --mix-full true
    (the same weights and logits), not as a head-gated model without its full attention pass."""
    model, _ = make_checkpoint(str(tmp_path / "ckpt.pt"), window=WINDOW, gate="head", mix_full=True)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    checkpoint["config"] = {**{k: v for k, v in checkpoint["config"].items() if k != "mix_full"}, "gate": "mix"}
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded = sample.load_model(str(tmp_path / "old.pt"), CPU)
    assert (loaded.cfg.gate, loaded.cfg.mix_full) == ("head", True)
    ids = torch.randint(0, 50257, (1, 40))
    with torch.no_grad():
        logits = [m.logits(ids, m.masks(ids.size(1), CPU)) for m in (loaded, model)]
    torch.testing.assert_close(*logits, rtol=0, atol=0)


@pytest.mark.parametrize("flag, value, shown", [("--temperature", "nan", "nan"), ("--temperature", "-1", "-1.0"),
                                                ("--temperature", "inf", "inf"), ("--top-k", "-1", "-1"),
                                                ("--max-new-tokens", "-5", "-5")])
def test_sampling_refuses_a_bad_number_naming_its_flag(tmp_path, flag, value, shown):
    """Refused before any checkpoint is read (this one does not exist)."""
    with pytest.raises(ValueError, match=rf"^{flag} {shown}: must be a finite number, 0 or more$"):
        sample.main([str(tmp_path / "none"), flag, value])


def test_sampling_repeats_for_a_seed(tmp_path):
    make_checkpoint(str(tmp_path / "ckpt.pt"), window=WINDOW)
    runs = [sample.main([str(tmp_path / "ckpt.pt"), "--prompt", PROMPT, "--max-new-tokens", "20", "--temperature",
                         "1.5", "--top-k", "100", "--seed", str(seed)]) for seed in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    assert all(0 <= t < 50257 for t in runs[0])


def test_command_lines(tmp_path):
    """export_hf.py and sample.py as a user runs them, on a run directory (both at once: each spends most of its
    time importing torch, on one core)."""
    make_checkpoint(str(tmp_path / "run" / "ckpt_step000002.pt"))
    commands = {"sample": [sys.executable, os.path.join(HERE, "sample.py"), str(tmp_path / "run"), "--prompt", PROMPT,
                           "--max-new-tokens", "5", "--device", "cpu"],
                "export": [sys.executable, os.path.join(HERE, "export_hf.py"), str(tmp_path / "run"),
                           str(tmp_path / "hf")]}
    processes = {name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, command in commands.items()}
    try:
        done = {name: (process.communicate(timeout=120), process.returncode) for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()
    (stdout, stderr), code = done["sample"]
    assert code == 0, stderr
    assert stdout.startswith(PROMPT) and "5 tokens in" in stderr and "tokens/s" in stderr
    (_, stderr), code = done["export"]
    assert code == 0, stderr
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    for main in (sample.main, lambda argv: export_hf.main([*argv, str(tmp_path / "out")])):
        with pytest.raises(ValueError, match="none: no such file or directory"):
            main([str(tmp_path / "none")])
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(ValueError, match="^checkpoint .*empty: the directory holds no checkpoint"):
            main([str(tmp_path / "empty")])
