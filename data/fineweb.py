"""
Token shards for train_gpt.py: download pre-tokenized FineWeb, or tokenize your own text.

    python data/fineweb.py                                  # FineWeb val shard + the train shards the default run reads
    python data/fineweb.py --train-shards 103               # all of FineWeb-10B
    python data/fineweb.py --tokenize books/*.txt --separator '\\x1e' --out data/books --prefix books
    python data/fineweb.py --tokenize corpus.jsonl.gz --out data/corpus --prefix corpus --val-tokens 1000000

Shard format (the one definition lives in train_gpt.py: SHARD_MAGIC, SHARD_VERSION, HEADER_INTS, BOS_ID,
read_shard_header, load_shard, write_shard): a header of HEADER_INTS little-endian int32 holding SHARD_MAGIC,
SHARD_VERSION and the token count n, the rest zeros; then n uint16 GPT-2 token ids. Every document starts with
BOS_ID, GPT-2's <|endoftext|>. A file's size is therefore exactly 4 * HEADER_INTS + 2 * n bytes, which is how a
truncated download is told from a whole one. Shard 000000 of a prefix is the validation shard ("PREFIX_val_000000.bin"),
and training shards count up from 000001 ("PREFIX_train_000001.bin", ...), as in the FineWeb repos.

Downloads go through huggingface_hub, so HF_ENDPOINT (a mirror) and HF_TOKEN (private or gated repos) apply.
Tokenizing needs no network: the GPT-2 ranks file ships beside this script as gpt2.tiktoken.
"""
import argparse
import glob
import gzip
import json
import math
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np
import tiktoken
import tiktoken.load
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_token, hf_hub_download
from huggingface_hub.utils import httpx  # the HTTP module huggingface_hub uses: httpx in 1.x, httpx2 in 2.x

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from train_gpt import BOS_ID, Hyperparameters, read_shard_header, write_shard  # noqa: E402


def shard_name(prefix: str, index: int) -> str:
    """Index 0 is the val shard, 1, 2, ... the train shards, as the FineWeb repos name them."""
    return f"{prefix}_val_{index:06d}.bin" if index == 0 else f"{prefix}_train_{index:06d}.bin"


# -----------------------------------------------------------------------------
# GPT-2 tokenizer, offline

GPT2_RANKS = os.path.join(REPO_ROOT, "data", "gpt2.tiktoken")
# the hash tiktoken itself expects for r50k_base
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""  # tiktoken's r50k


def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's BPE (tiktoken's "gpt2"/r50k_base), built from the shipped ranks file instead of a download."""
    ranks = tiktoken.load.load_tiktoken_bpe(GPT2_RANKS, expected_hash=GPT2_RANKS_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": BOS_ID},
                             explicit_n_vocab=BOS_ID + 1)  # <|endoftext|> is GPT-2's last id


# -----------------------------------------------------------------------------
# Download FineWeb from the Hugging Face Hub

FINEWEB_REPO = "kjj0/fineweb10B-gpt2"
FINEWEB_PREFIX = "fineweb"  # its files are fineweb_val_000000.bin, fineweb_train_000001.bin, ...
FINEWEB_SHARD_TOKENS = 100_000_000  # tokens in each FineWeb shard
DEFAULT_OUT = os.path.join(REPO_ROOT, "data", "fineweb10B")  # where train_gpt.py's default globs look
STAGING = ".download"  # subfolder of --out holding huggingface_hub's cache while a shard downloads


class DownloadError(Exception):
    """A shard could not be fetched; the message says what failed and what to try."""


def default_train_shards() -> int:
    """Train shards that train_gpt.py's default run reads: it reads the shards as one stream, steps x batch_tokens
    tokens plus one for the last target."""
    h = Hyperparameters()
    return math.ceil((h.steps * h.batch_tokens + 1) / FINEWEB_SHARD_TOKENS)


def fetch_shard(repo: str, name: str, path: str) -> None:
    """Downloads repo's file `name` to path. It arrives in a staging folder beside path and is moved into place
    only once its header checks out, so an interrupted or bad download never leaves a file that looks whole.
    huggingface_hub's cache lives in that folder, not ~/.cache, so each shard is stored once."""
    staging = os.path.join(os.path.dirname(path), STAGING)
    shutil.rmtree(staging, ignore_errors=True)  # partial files from a killed run; they can't be resumed
    try:
        try:
            cached = hf_hub_download(repo, name, repo_type="dataset", cache_dir=staging)
        # OSError covers the Hub's HTTP errors, a missing or truncated file and no network; httpx.HTTPError the
        # transfer failing after huggingface_hub's retries; ValueError a malformed --repo; RuntimeError hf_xet.
        except (OSError, httpx.HTTPError, ValueError, RuntimeError) as e:
            raise DownloadError(f"could not download {name} from {hf_constants.ENDPOINT}/datasets/{repo}: "
                                f"{describe(e)}") from e
        blob = os.path.realpath(cached)  # the cache's snapshot entry is a symlink to the blob
        try:
            read_shard_header(blob)
        except ValueError as e:
            problem = str(e).replace(blob, f"{repo}/{name}")  # the staging path is gone by the time this prints
            raise DownloadError(f"{name} downloaded but is not a whole shard: {problem}. "
                                f"Is --repo a pre-tokenized GPT-2 FineWeb repo?") from e
        os.replace(blob, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def describe(error: BaseException) -> str:
    """The error and its cause on one line, without the Hub token, which a server may echo back. The cause
    matters: huggingface_hub reports a 403 or a refused connection as "cannot find the requested files"."""
    parts = [error] + ([error.__cause__] if error.__cause__ else [])
    text = " <- ".join(f"{type(e).__name__}: {' '.join(str(e).split())}" for e in parts)
    token = get_token()
    return text.replace(token, "<HF_TOKEN>") if token else text


def make_out_dir(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir}: a file, not a folder; pass a folder for the shards")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a file on its path, or no permission
        raise ValueError(f"--out {out_dir}: cannot make the folder ({e}); pass a folder you can write to") from e


def download_fineweb(repo: str, prefix: str, train_shards: int, out_dir: str) -> None:
    names = [shard_name(prefix, index) for index in range(train_shards + 1)]
    make_out_dir(out_dir)
    print(f"{len(names)} shards of {hf_constants.ENDPOINT}/datasets/{repo} into {out_dir}")
    fetched = 0
    for i, name in enumerate(names, 1):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            try:
                read_shard_header(path)
            except ValueError as e:
                print(f"[{i}/{len(names)}] {e}; fetching it again", flush=True)
                os.remove(path)  # useless as it is, and its space is needed for the new copy
            else:
                print(f"[{i}/{len(names)}] {name}: whole, skipped", flush=True)
                continue
        else:
            print(f"[{i}/{len(names)}] {name}: fetching", flush=True)
        start = time.perf_counter()
        try:
            fetch_shard(repo, name, path)
        except DownloadError as e:
            raise DownloadError(f"{e}\nNothing was kept for {name}; the shards before it are whole. Check the "
                                f"network and --repo. HF_ENDPOINT (a mirror) and HF_TOKEN (private or gated repos) "
                                f"are honoured, and `--tokenize` makes shards from local text offline.") from e
        fetched += 1
        megabytes, seconds = os.path.getsize(path) / 1e6, time.perf_counter() - start
        print(f"[{i}/{len(names)}] {name}: {megabytes:,.0f} MB in {seconds:.0f} s ({megabytes / seconds:,.1f} MB/s)",
              flush=True)
    print(f"done: {fetched} fetched, {len(names) - fetched} already whole")


# -----------------------------------------------------------------------------
# Tokenize local text

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
TEXT_PREFIX = "text"  # not FineWeb's, so train_gpt.py's default globs never mix your text into FineWeb
READ_CHARS = 1 << 20  # characters read from a .txt at a time while looking for separators
BATCH_CHARS = 1 << 20  # characters of documents per worker task: large enough that pickling is cheap

_encoding = None  # this worker's tokenizer, built once by _init_worker rather than once per task


def _init_worker() -> None:
    global _encoding
    _encoding = gpt2_encoding()


def encode_documents(documents: list) -> np.ndarray:
    """BOS_ID followed by each document's tokens, all concatenated. encode_ordinary treats a literal
    "<|endoftext|>" in the text as plain text, so BOS_ID marks document starts and nothing else."""
    ids = []
    for document in documents:
        ids.append(BOS_ID)
        ids.extend(_encoding.encode_ordinary(document))
    return np.array(ids, dtype=np.uint16)


def parse_separator(text: str) -> str:
    """--separator with backslash escapes decoded: a shell's '\\x1e' becomes the byte 0x1E, ASCII's record separator."""
    try:
        separator = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} has a bad escape ({e.reason}); write e.g. '\\x1e' or '\\n\\n'")
    if not separator:
        raise argparse.ArgumentTypeError("must not be empty; leave --separator out for one document per .txt file")
    return separator


def split_stream(f, separator: str):
    """The pieces of a text stream between separators, read a chunk at a time so a file larger than memory is
    fine as long as each document fits. Text since the last separator is kept as a list of chunks and joined
    once, because growing one string chunk by chunk would copy a long document over and over."""
    pending, tail = [], ""  # tail: the last characters of pending, where a separator may have begun
    keep = len(separator) - 1
    while chunk := f.read(READ_CHARS):
        if separator not in tail + chunk:
            pending.append(chunk)
            tail = (tail + chunk)[-keep:] if keep else ""
            continue
        pieces = ("".join(pending) + chunk).split(separator)
        last = pieces.pop()
        pending, tail = [last], last[-keep:] if keep else ""
        yield from pieces
    yield "".join(pending)


def read_documents(path: str, separator):
    """The documents of one input file: a .txt is one document, or several split by separator; a .jsonl or
    .jsonl.gz has one JSON object per line with the document in its "text" field."""
    try:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield from split_stream(f, separator) if separator else [f.read()]
            return
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: not JSON ({e}); each line must be one JSON object")
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{line_number}: no string field \"text\"; each line must look like "
                                     f'{{"text": "..."}}')
                yield record["text"]
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: unreadable ({e}); inputs must be UTF-8 text, and a .gz a whole gzip file")


def document_batches(paths: list, separator):
    """Lists of documents of about BATCH_CHARS characters, in input order. Empty documents are dropped: a lone
    BOS_ID teaches nothing. Inputs with no text at all are an error, rather than no shards."""
    batch, chars, found = [], 0, False
    for path in paths:
        for document in read_documents(path, separator):
            if not document:
                continue
            batch.append(document)
            chars += len(document)
            found = True
            if chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch
    if not found:
        raise ValueError(f"--tokenize {' '.join(paths)}: no text in {'it' if len(paths) == 1 else 'them'} (empty "
                         f"documents are left out); pass files that hold text")


def check_inputs(paths: list, out_dir: str, prefix: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"--tokenize {path}: no such file")
        if not path.endswith(TEXT_SUFFIXES):
            raise ValueError(f"--tokenize {path}: unknown kind of file; expected one of {', '.join(TEXT_SUFFIXES)}")
    existing = sorted(glob.glob(os.path.join(glob.escape(out_dir), glob.escape(prefix) + "_val_*.bin")) +
                      glob.glob(os.path.join(glob.escape(out_dir), glob.escape(prefix) + "_train_*.bin")))
    if existing:
        raise ValueError(f"--out {out_dir} already holds {len(existing)} shards named {prefix}_* (e.g. {existing[0]}); "
                         f"delete them to remake them, or pick another --out or --prefix")


def write_token_shards(token_arrays, out_dir: str, prefix: str, val_tokens: int, shard_tokens: int,
                       max_tokens: int, written: list, start: float) -> tuple:
    """Cuts the token stream into the val shard (its first val_tokens; none if 0), then train shards of
    shard_tokens, the last one shorter, stopping after max_tokens (0 = no limit). Documents may straddle
    shards, as in FineWeb: the loader reads the shards as one stream. Appends each path to `written` as soon
    as it exists, so the caller can remove them if a later step fails. Progress rates count from `start`.
    Returns (tokens, documents) written."""
    index = 0 if val_tokens else 1
    pending, pending_count, total, documents = [], 0, 0, 0
    for tokens in token_arrays:
        if max_tokens:
            tokens = tokens[: max_tokens - total]
        pending.append(tokens)
        pending_count += len(tokens)
        total += len(tokens)
        documents += int(np.count_nonzero(tokens == BOS_ID))
        while pending_count >= (size := val_tokens if index == 0 else shard_tokens):
            stream = np.concatenate(pending)
            write_one(stream[:size], os.path.join(out_dir, shard_name(prefix, index)), written, total, start)
            pending, pending_count, index = [stream[size:].copy()], pending_count - size, index + 1
        if max_tokens and total >= max_tokens:
            break
    if index == 0:
        raise ValueError(f"{total:,} tokens in all (the whole input, or --max-tokens), all of them for validation "
                         f"(--val-tokens {val_tokens:,}) and none for training; lower --val-tokens")
    if pending_count:
        write_one(np.concatenate(pending), os.path.join(out_dir, shard_name(prefix, index)), written, total, start)
    return total, documents


def write_one(tokens: np.ndarray, path: str, written: list, total: int, start: float) -> None:
    try:
        write_shard(path, tokens)
    except OSError as e:
        raise ValueError(f"{path}: cannot write the shard ({e}); free space on its disk or pass another --out") from e
    written.append(path)
    seconds = time.perf_counter() - start
    print(f"{path}: {len(tokens):,} tokens ({total:,} tokenized so far, {total / seconds:,.0f} tokens/s)",
          flush=True)


def usable_cores() -> int:
    # sched_getaffinity honours taskset and container CPU sets, which os.cpu_count ignores; macOS lacks it
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenize_files(paths: list, out_dir: str, prefix: str, separator, val_tokens: int, shard_tokens: int,
                   max_tokens: int, workers: int) -> None:
    """Tokenizes the files into shards under out_dir, refusing to replace shards already there. On any
    failure, the shards this call wrote are removed, so a half-made set never passes for a whole one."""
    check_inputs(paths, out_dir, prefix)
    make_out_dir(out_dir)
    workers = workers or usable_cores()
    start = time.perf_counter()
    written = []
    try:
        # imap feeds the workers through a pipe and blocks when it is full, so only a few batches are read
        # ahead of the tokenizers: memory stays bounded for inputs far larger than RAM.
        with multiprocessing.Pool(workers, initializer=_init_worker) as pool:
            token_arrays = pool.imap(encode_documents, document_batches(paths, separator))
            total, documents = write_token_shards(token_arrays, out_dir, prefix, val_tokens, shard_tokens,
                                                  max_tokens, written, start)
    except BaseException:
        for path in written:
            os.remove(path)
        if written:
            print(f"removed the {len(written)} shards written before the error", file=sys.stderr)
        raise
    seconds = time.perf_counter() - start
    print(f"done: {documents:,} documents, {total:,} tokens in {len(written)} shards, {seconds:.1f} s, "
          f"{total / seconds:,.0f} tokens/s on {workers} workers")


# -----------------------------------------------------------------------------
# int main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="folder for the shards (default: %(default)s, where train_gpt.py looks)")
    hub = parser.add_argument_group("download FineWeb (the default)")
    hub.add_argument("--train-shards", type=int, default=default_train_shards(),
                     help=f"training shards of {FINEWEB_SHARD_TOKENS:,} tokens to fetch besides the val shard "
                          f"(default: %(default)s, enough for train_gpt.py's default --steps x --batch-tokens)")
    hub.add_argument("--repo", default=FINEWEB_REPO,
                     help="Hub dataset repo of shards in this format (default: %(default)s); pass --prefix if its "
                          f"files are not named {FINEWEB_PREFIX}_*")
    text = parser.add_argument_group("tokenize your own text (no network)")
    text.add_argument("--tokenize", nargs="+", metavar="PATH",
                      help=".txt (one document per file, or split by --separator), .jsonl or .jsonl.gz "
                           "(one {\"text\": ...} object per line)")
    text.add_argument("--separator", type=parse_separator,
                      help="string between documents in .txt files, backslash escapes allowed, e.g. '\\x1e'")
    parser.add_argument("--prefix", help="shard names: PREFIX_val_000000.bin, PREFIX_train_000001.bin, ... "
                                         f"(default: {FINEWEB_PREFIX} to download, {TEXT_PREFIX} with --tokenize)")
    text.add_argument("--val-tokens", type=int, default=Hyperparameters().val_tokens + 1,
                      help="tokens in the val shard, taken first; 0 = no val shard (default: %(default)s, "
                           "what train_gpt.py's default --val-tokens reads)")
    text.add_argument("--shard-tokens", type=int, default=FINEWEB_SHARD_TOKENS,
                      help="tokens per training shard (default: %(default)s, as FineWeb)")
    text.add_argument("--max-tokens", type=int, default=0, help="stop after this many tokens in all; 0 = no limit")
    text.add_argument("--workers", type=int, default=0, help="tokenizer processes; 0 = one per usable core")
    args = parser.parse_args(argv)
    for flag, minimum in (("train_shards", 0), ("val_tokens", 0), ("shard_tokens", 1), ("max_tokens", 0),
                          ("workers", 0)):
        if getattr(args, flag) < minimum:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least {minimum}")
    if args.separator is not None and not args.tokenize:
        parser.error("--separator only applies with --tokenize")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.prefix is not None and os.path.basename(args.prefix) != args.prefix:
            raise ValueError(f"--prefix {args.prefix!r}: a name, not a path; pass the folder as --out")
        if args.tokenize:
            tokenize_files(args.tokenize, args.out, args.prefix or TEXT_PREFIX, args.separator, args.val_tokens,
                           args.shard_tokens, args.max_tokens, args.workers)
        else:
            download_fineweb(args.repo, args.prefix or FINEWEB_PREFIX, args.train_shards, args.out)
    except (ValueError, DownloadError) as e:
        sys.exit(f"data/fineweb.py: {e}")


if __name__ == "__main__":
    main()
