"""
Tests of data/fineweb.py and the shard format it shares with train_gpt.py. CPU only, no network: the download
tests talk to a stand-in for the Hugging Face Hub on 127.0.0.1.

    python -m pytest -q test_data.py
"""
import gzip
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from huggingface_hub import constants as hf_constants

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "data"))
import fineweb  # noqa: E402
from train_gpt import (BOS_ID, HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, load_shard, read_shard_header,  # noqa: E402
                       write_shard)

GPT2_VOCAB = BOS_ID + 1


@pytest.fixture(scope="module")
def enc():
    return fineweb.gpt2_encoding()


def expected_stream(enc, documents):
    """What the shards must hold, computed without the tokenizing pipeline: BOS_ID, then the tokens, per document."""
    ids = []
    for document in documents:
        ids += [BOS_ID] + enc.encode_ordinary(document)
    return np.array(ids, dtype=np.uint16)


def read_shards(out_dir, prefix):
    val = sorted(p for p in os.listdir(out_dir) if p.startswith(f"{prefix}_val_"))
    train = sorted(p for p in os.listdir(out_dir) if p.startswith(f"{prefix}_train_"))
    return ([load_shard(os.path.join(out_dir, p), GPT2_VOCAB) for p in val],
            [load_shard(os.path.join(out_dir, p), GPT2_VOCAB) for p in train], val, train)


# -----------------------------------------------------------------------------
# GPT-2 tokenizer


def test_gpt2_encoding_matches_gpt2(enc):
    """The shipped ranks file gives GPT-2's ids, and decoding undoes encoding on awkward text."""
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [BOS_ID]
    assert enc.n_vocab == GPT2_VOCAB
    sample = ("Ünïcödé — naïve café, 日本語のテキスト, emoji 🧪🚀 and \u200b zero-width.\n\n\n"
              "   leading spaces,\ttabs\t\tand trailing   \n"
              "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\r\n")
    assert enc.decode(enc.encode_ordinary(sample)) == sample


# -----------------------------------------------------------------------------
# Tokenizing local text


@pytest.fixture
def corpus(tmp_path):
    """Small inputs of every kind, and the documents they hold in order."""
    plain = "One document, whole.\n\nIt has \x1f but no record separator.\n"
    parts = ["First of three: Ünïcödé.", "", "Second, after an empty one.\n", "Third\n\n\twith    runs."]
    jsonl = ["json doc one", "json doc two — with unicode ✓", "json doc three"]
    gz = ["gzipped doc " + "word " * 50, "last gzipped doc"]
    (tmp_path / "plain.txt").write_text(plain, encoding="utf-8")
    (tmp_path / "parts.txt").write_text("\x1e".join(parts) + "\x1e", encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(jsonl))
                                         + "\n\n", encoding="utf-8")
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in gz))
    paths = [str(tmp_path / name) for name in ("plain.txt", "parts.txt", "docs.jsonl", "docs.jsonl.gz")]
    documents = [plain] + [p for p in parts if p] + jsonl + gz
    return paths, documents


def test_tokenize_writes_expected_shards(enc, corpus, tmp_path, monkeypatch):
    """Every kind of input, split over several workers: the val shard holds the first --val-tokens tokens, train
    shards --shard-tokens each (the last shorter), and together exactly BOS + tokens per document."""
    monkeypatch.setattr(fineweb, "BATCH_CHARS", 40)  # many small tasks, so their order across workers matters
    monkeypatch.setattr(fineweb, "READ_CHARS", 7)  # separators land on chunk boundaries
    paths, documents = corpus
    out = tmp_path / "out"
    fineweb.main(["--tokenize", *paths, "--separator", r"\x1e", "--out", str(out), "--prefix", "t",
                  "--val-tokens", "37", "--shard-tokens", "50", "--workers", "2"])
    expected = expected_stream(enc, documents)
    val, train, val_names, train_names = read_shards(out, "t")
    assert val_names == ["t_val_000000.bin"]
    assert train_names == [f"t_train_{i:06d}.bin" for i in range(1, len(train) + 1)]
    assert len(val[0]) == 37 and len(train) >= 2
    assert [len(t) for t in train[:-1]] == [50] * (len(train) - 1) and 0 < len(train[-1]) <= 50
    np.testing.assert_array_equal(np.concatenate(val + train), expected)
    assert np.count_nonzero(expected == BOS_ID) == len(documents)


def test_max_tokens_and_no_val_shard(enc, corpus, tmp_path):
    """--max-tokens cuts the stream after that many tokens; --val-tokens 0 writes no val shard."""
    paths, documents = corpus
    out = tmp_path / "out"
    fineweb.main(["--tokenize", *paths, "--separator", r"\x1e", "--out", str(out), "--prefix", "m",
                  "--val-tokens", "0", "--shard-tokens", "40", "--max-tokens", "100", "--workers", "1"])
    val, train, _, _ = read_shards(out, "m")
    assert val == [] and [len(t) for t in train] == [40, 40, 20]
    np.testing.assert_array_equal(np.concatenate(train), expected_stream(enc, documents)[:100])


def test_separator_split_across_reads(monkeypatch):
    """A separator of several characters is found wherever the read chunks happen to cut it."""
    text = "alpha\n===\nbeta\n===\n\n===\ngamma===delta\n==\n=="
    for read_chars in range(1, 12):
        monkeypatch.setattr(fineweb, "READ_CHARS", read_chars)
        assert list(fineweb.split_stream(io.StringIO(text), "\n===\n")) == text.split("\n===\n")


def test_refuses_to_overwrite_shards(corpus, tmp_path):
    """A second run into the same --out and --prefix stops before touching the shards already there."""
    paths, _ = corpus
    args = ["--tokenize", *paths, "--out", str(tmp_path / "out"), "--val-tokens", "10", "--workers", "1"]
    fineweb.main(args)
    before = {p: (tmp_path / "out" / p).read_bytes() for p in os.listdir(tmp_path / "out")}
    with pytest.raises(SystemExit, match="already holds 2 shards named text_"):
        fineweb.main(args)
    assert {p: (tmp_path / "out" / p).read_bytes() for p in os.listdir(tmp_path / "out")} == before


def test_bad_input_removes_partial_output(tmp_path, monkeypatch):
    """A malformed line after some shards were written: the error names file and line, and the shards go."""
    monkeypatch.setattr(fineweb, "BATCH_CHARS", 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(50)) + "{oops\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=re.escape(f"{bad}:51: not JSON")):
        fineweb.main(["--tokenize", str(bad), "--out", str(out), "--val-tokens", "5", "--shard-tokens", "10",
                      "--workers", "2"])
    assert os.listdir(out) == []


def test_input_errors_are_clear(tmp_path):
    """Unknown file kinds, missing fields and too little text for --val-tokens each get a message naming the fix."""
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "a.jsonl").write_text('{"body": "no text field"}\n')
    (tmp_path / "a.txt").write_text("tiny")
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"a\.csv: unknown kind of file"):
        fineweb.main(["--tokenize", str(tmp_path / "a.csv"), "--out", out])
    with pytest.raises(SystemExit, match=r"a\.jsonl:1: no string field \"text\""):
        fineweb.main(["--tokenize", str(tmp_path / "a.jsonl"), "--out", out, "--workers", "1"])
    with pytest.raises(SystemExit, match="none for training; lower --val-tokens"):
        fineweb.main(["--tokenize", str(tmp_path / "a.txt"), "--out", out, "--val-tokens", "100", "--workers", "1"])
    assert os.listdir(out) == []


def test_inputs_without_text_are_an_error_whatever_the_val_tokens(tmp_path):
    """An empty file is not a --val-tokens problem, and with --val-tokens 0 it does not end in success with no
    shards."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    out = tmp_path / "out"
    for val_tokens in ("100", "0"):
        with pytest.raises(SystemExit, match=rf"^data/fineweb.py: --tokenize {tmp_path / 'empty.txt'} "
                                             rf"{tmp_path / 'empty.jsonl'}: no text in them \(empty documents are left "
                                             r"out\); pass files that hold text$"):
            fineweb.main(["--tokenize", str(tmp_path / "empty.txt"), str(tmp_path / "empty.jsonl"), "--out", str(out),
                          "--val-tokens", val_tokens, "--workers", "1"])
        assert os.listdir(out) == []


def test_output_paths_that_cannot_hold_shards_are_one_line(tmp_path):
    """--prefix is a name (../x would write outside --out), and an --out that is a file or lies under one is refused,
    for tokenizing and for downloading, before anything is written."""
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "a_file").write_text("the user's")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^data/fineweb.py: --prefix '../x': a name, not a path; pass the folder as "
                                         r"--out$"):
        fineweb.main(["--tokenize", str(tmp_path / "a.txt"), "--out", str(out), "--prefix", "../x"])
    for mode in (["--tokenize", str(tmp_path / "a.txt")], ["--train-shards", "0"]):
        with pytest.raises(SystemExit, match=rf"^data/fineweb.py: --out {tmp_path / 'a_file'}: a file, not a folder; "
                                             r"pass a folder for the shards$"):
            fineweb.main([*mode, "--out", str(tmp_path / "a_file")])
        with pytest.raises(SystemExit, match=rf"^data/fineweb.py: --out {tmp_path / 'a_file' / 'out'}: cannot make the "
                                             r"folder \(.*\); pass a folder you can write to$"):
            fineweb.main([*mode, "--out", str(tmp_path / "a_file" / "out")])
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "a_file"] and (tmp_path / "a_file").read_text() == "the user's"


def test_a_shard_that_cannot_be_written_is_one_line_and_removes_the_others(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("some text " * 100)
    out = tmp_path / "out"
    writes = []

    def fill_the_disk_on_the_second_shard(path, tokens):
        if writes:
            raise OSError(28, "No space left on device")
        writes.append(path)
        write_shard(path, tokens)

    monkeypatch.setattr(fineweb, "write_shard", fill_the_disk_on_the_second_shard)
    with pytest.raises(SystemExit, match=rf"^data/fineweb.py: {out / 'text_train_000001.bin'}: cannot write the shard "
                                         r"\(\[Errno 28\] No space left on device\); free space on its disk or pass "
                                         r"another --out$"):
        fineweb.main(["--tokenize", str(tmp_path / "a.txt"), "--out", str(out), "--val-tokens", "10", "--workers", "1"])
    assert os.listdir(out) == []


# -----------------------------------------------------------------------------
# Shard format


def test_shard_round_trip(tmp_path):
    """write_shard then load_shard gives the same tokens, and the header holds magic, version and count."""
    tokens = np.random.default_rng(0).integers(0, GPT2_VOCAB, size=1234).astype(np.uint16)
    path = str(tmp_path / "s.bin")
    write_shard(path, tokens)
    assert read_shard_header(path) == len(tokens)
    np.testing.assert_array_equal(load_shard(path, GPT2_VOCAB), tokens)
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    assert list(header[:3]) == [SHARD_MAGIC, SHARD_VERSION, len(tokens)] and not header[3:].any()
    assert os.path.getsize(path) == 4 * HEADER_INTS + 2 * len(tokens)
    assert os.listdir(tmp_path) == ["s.bin"]  # no temporary file left behind


@pytest.mark.parametrize("damage, message", [
    ("magic", "magic number"),
    ("version", "format version"),
    ("truncated", "truncated or damaged"),
    ("short", "shorter than"),
    ("token", "is >= the vocabulary size"),
])
def test_damaged_shards_are_rejected(tmp_path, damage, message):
    """Each kind of damage raises a ValueError that names the file."""
    path = str(tmp_path / "s.bin")
    tokens = np.arange(100, dtype=np.uint16)
    if damage == "token":
        tokens[17] = GPT2_VOCAB
    write_shard(path, tokens)
    data = bytearray(open(path, "rb").read())
    if damage == "magic":
        data[0:4] = np.int32(SHARD_MAGIC + 1).tobytes()
    if damage == "version":
        data[4:8] = np.int32(SHARD_VERSION + 1).tobytes()
    if damage == "truncated":
        data = data[:-2]
    if damage == "short":
        data = data[:100]
    open(path, "wb").write(data)
    with pytest.raises(ValueError, match=re.escape(path) + ".*" + message):
        load_shard(path, GPT2_VOCAB)


# -----------------------------------------------------------------------------
# Download from a stand-in Hub

REPO = "test-org/fineweb-mini"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_testtokenthatmustneverbeprinted"


class FakeHub:
    """The Hub as huggingface_hub 2.x meets it for an LFS file, on 127.0.0.1. HEAD or GET of
    /datasets/{repo}/resolve/{revision}/{name} answers 302 to a CDN on another origin, carrying X-Repo-Commit,
    X-Linked-Etag and X-Linked-Size; huggingface_hub takes the metadata off the 302 without following it, then
    GETs the CDN url, whose answer must have X-Linked-Size bytes. `requests` records (server, method, path).
    `refuse` makes the Hub answer 403, echoing the Authorization header the way a careless proxy might;
    `cdn_status` makes the CDN answer another status; `served` replaces a file's bytes on the CDN."""

    def __init__(self, files):
        self.files = files
        self.sha = {hashlib.sha256(data).hexdigest(): name for name, data in files.items()}
        self.requests, self.refuse, self.cdn_status, self.served = [], False, 200, {}
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self.handler("hub"))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), self.handler("cdn"))
        self.url = f"http://127.0.0.1:{self.hub.server_port}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_port}"
        for server in (self.hub, self.cdn):
            # a short poll interval, so that close() returns quickly
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def handler(self, role):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(send_body=False)

            def do_GET(self):
                self.answer(send_body=True)

            def answer(self, send_body):
                fake.requests.append((role, self.command, self.path))
                status, headers, body = fake.hub_answer(self) if role == "hub" else fake.cdn_answer(self)
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass  # keeps pytest's captured output to what fineweb.py prints

        return Handler

    def hub_answer(self, request):
        prefix = f"/datasets/{REPO}/resolve/main/"
        name = request.path[len(prefix):] if request.path.startswith(prefix) else None
        if self.refuse:
            return 403, {"X-Error-Message": f"no access for {request.headers.get('Authorization')}"}, b""
        if name not in self.files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b""
        sha = hashlib.sha256(self.files[name]).hexdigest()
        return 302, {"Location": f"{self.cdn_url}/blobs/{sha}", "X-Repo-Commit": COMMIT,
                     "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(self.files[name])),
                     "ETag": f'"{sha[:40]}"'}, b""

    def cdn_answer(self, request):
        name = self.sha.get(request.path.removeprefix("/blobs/"))
        if name is None or self.cdn_status != 200:
            return self.cdn_status if name else 404, {}, b""
        return 200, {"Content-Type": "application/octet-stream"}, self.served.get(name, self.files[name])

    def gets(self):
        """Names of the files the CDN was asked for."""
        return sorted(self.sha[p.removeprefix("/blobs/")] for role, method, p in self.requests
                      if role == "cdn" and method == "GET")


def shard_bytes(tmp_path, name, count, seed):
    path = str(tmp_path / f"src_{name}")
    write_shard(path, np.random.default_rng(seed).integers(0, GPT2_VOCAB, size=count).astype(np.uint16))
    return open(path, "rb").read()


def point_hub_at(monkeypatch, url):
    """What setting HF_ENDPOINT=url before importing huggingface_hub would have set."""
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A FakeHub serving a val shard and two train shards, with huggingface_hub in this process pointed at it.
    huggingface_hub reads HF_ENDPOINT, HF_HUB_DISABLE_TELEMETRY and HF_HUB_OFFLINE once, at import, into the
    constants patched here (the subprocess test sets the real variables). No retry sleeps, so a refused
    connection fails in milliseconds rather than after huggingface_hub's 23 seconds of backoff."""
    names = [fineweb.shard_name("fineweb", i) for i in range(3)]
    fake = FakeHub({name: shard_bytes(tmp_path, name, 300 + 100 * i, i) for i, name in enumerate(names)})
    point_hub_at(monkeypatch, fake.url)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)  # else it also GETs /api/agent-harnesses
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # a developer's HF_HUB_OFFLINE=1 would block it
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    yield fake
    fake.close()


def download(out, train_shards=2):
    fineweb.main(["--repo", REPO, "--train-shards", str(train_shards), "--out", str(out)])


def test_download_fetches_skips_and_refetches(hub, tmp_path):
    """A fresh download checks out byte for byte and clears what a killed run left in the staging folder; a rerun
    sends no request at all; a truncated file and one with a bad magic are fetched again, and only they."""
    out = tmp_path / "fineweb"
    killed = out / fineweb.STAGING / "blobs" / "0123abcd.incomplete"
    killed.parent.mkdir(parents=True)
    killed.write_bytes(b"half a shard")
    download(out)
    assert sorted(os.listdir(out)) == sorted(hub.files)  # nothing else, no staging folder left
    assert all((out / name).read_bytes() == data for name, data in hub.files.items())
    assert hub.gets() == sorted(hub.files)

    hub.requests.clear()
    download(out)
    assert hub.requests == []

    val, train = "fineweb_val_000000.bin", "fineweb_train_000001.bin"
    (out / val).write_bytes(hub.files[val][:-2])
    (out / train).write_bytes(np.int32(0).tobytes() + hub.files[train][4:])
    download(out)
    assert hub.gets() == sorted([val, train])
    assert all((out / name).read_bytes() == data for name, data in hub.files.items())


@pytest.mark.parametrize("failure, message", [
    ("refused", "403 Forbidden"),
    ("cdn_error", "500 Internal Server Error"),
    ("cut_short", "Consistency check failed"),
    ("not_a_shard", "downloaded but is not a whole shard"),
    ("missing", "EntryNotFound|RemoteEntryNotFoundError"),
    ("no_server", "ConnectError"),
])
def test_download_failure_is_clear_and_leaves_nothing(hub, tmp_path, monkeypatch, capsys, failure, message):
    """When the Hub refuses, the CDN errs, the transfer is cut short, the file is no shard, the file is missing
    or nothing listens: a non-zero exit naming the file and the cause, the hints on HF_ENDPOINT, HF_TOKEN and
    --tokenize, no file left behind, and never the token."""
    val = "fineweb_val_000000.bin"
    if failure == "refused":
        hub.refuse = True
    if failure == "cdn_error":
        hub.cdn_status = 500
    if failure == "cut_short":
        hub.served[val] = hub.files[val][:-100]
    if failure == "not_a_shard":
        hub.served[val] = np.int32(7).tobytes() + hub.files[val][4:]
    if failure == "missing":
        del hub.files["fineweb_train_000002.bin"]
    if failure == "no_server":
        with socket.socket() as s:  # a port nothing listens on once the socket closes
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"
        point_hub_at(monkeypatch, url)
    out = tmp_path / "fineweb"
    with pytest.raises(SystemExit) as exit_info:
        download(out)
    error = str(exit_info.value.code)
    assert re.search(message, error), error
    assert "could not download" in error or "not a whole shard" in error
    for hint in ("HF_ENDPOINT", "HF_TOKEN", "--tokenize"):
        assert hint in error
    captured = capsys.readouterr()
    assert TOKEN not in error + captured.out + captured.err
    kept = sorted(hub.files) if failure == "missing" else []  # the shards before the failing one, whole
    assert sorted(os.listdir(out)) == kept  # and no staging folder
    assert all((out / name).read_bytes() == hub.files[name] for name in kept)
    if failure == "refused":
        assert "<HF_TOKEN>" in error  # the server did echo it, and it was hidden


def test_download_cli_honours_hf_endpoint(tmp_path):
    """The real route: HF_ENDPOINT in the environment of `python data/fineweb.py`, progress on the console, and
    --prefix for a repo whose files are named otherwise."""
    names = [fineweb.shard_name("finewebedu", i) for i in range(2)]
    fake = FakeHub({name: shard_bytes(tmp_path, name, 500, i) for i, name in enumerate(names)})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN=TOKEN, NO_PROXY="127.0.0.1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    out = tmp_path / "fineweb"
    try:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "data", "fineweb.py"), "--repo", REPO,
                                 "--prefix", "finewebedu", "--train-shards", "1", "--out", str(out)],
                                env=env, capture_output=True, text=True, timeout=120)
    finally:
        fake.close()
    assert result.returncode == 0, result.stderr
    assert "[2/2] finewebedu_train_000001.bin: fetching" in result.stdout
    resolve = f"/datasets/{REPO}/resolve/main/"
    assert [(role, method) for role, method, _ in fake.requests] == [("hub", "HEAD"), ("cdn", "GET")] * 2
    assert [p for role, _, p in fake.requests if role == "hub"] == [resolve + name for name in names]
    assert sorted(os.listdir(out)) == sorted(names)
    assert all((out / name).read_bytes() == data for name, data in fake.files.items())
    assert TOKEN not in result.stdout + result.stderr
