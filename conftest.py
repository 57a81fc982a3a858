"""pytest's set-up for every test file: glibc keeps the memory it frees in this process.

The tests train tiny models in this process (train_gpt.main()), and on the CPU a step's logits (1024 tokens x 50304
ids, about 200 MB, several times over with the cross-entropy's gradient) are each larger than glibc's mmap
threshold: every step would map them afresh and page-fault them in, about half of a tiny model's step time.
These are run.sh's demo settings (MALLOC_MMAP_THRESHOLD_ and friends), which cannot reach a process already
running, so they are set here through mallopt(); the test files' subprocesses get them in their environment
(test_reliability.ENV). Only speed changes: what memory holds is the same, and on the CPU no test reads memory
figures.
"""
import ctypes
import ctypes.util
import sys

if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
        # mallopt takes an int: 2**31 - 1 stands for run.sh's 4,000,000,000 trim threshold
        for param, value in ((M_MMAP_THRESHOLD, 2_000_000_000), (M_TRIM_THRESHOLD, 2**31 - 1),
                             (M_TOP_PAD, 1_000_000_000)):
            _libc.mallopt(param, value)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): the tests only run slower
        pass
