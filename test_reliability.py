"""Checkpoints, exact resume, stop signals, the non-finite guard and input checks, on the CPU.

    python -m pytest -q test_reliability.py
"""
import os

import numpy as np
import torch

import train_gpt as tg
from test_train import make_shards

CPU = torch.device("cpu")


def test_loader_seek_continues_the_stream_exactly(tmp_path):
    """A loader put at position p by seek reads the same batches as one that read its way to p: mid-shard, on
    shard and epoch boundaries, epochs later, for every rank."""
    lengths, seed = [500, 300, 70], 3
    files = make_shards(tmp_path, lengths)
    for world_size in (1, 2):
        for rank in range(world_size):
            reader = tg.DataLoader(files, 2, 8, rank, world_size, 50304, CPU, seed=seed)
            for _ in range(200):  # several epochs of 870 tokens, in steps of 16 or 32 tokens
                seeker = tg.DataLoader(files, 2, 8, rank, world_size, 50304, CPU, seed=seed)
                seeker.seek(reader.position)
                for _ in range(3):
                    assert all(torch.equal(a, b) for a, b in zip(seeker.next_batch(), reader.next_batch()))
            assert reader.epoch >= 4 and reader.position == seeker.position
