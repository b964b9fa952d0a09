"""CaseOps (records 2026-04-18/19, used by the SOTA): a lossless case transform, its validation byte sidecar, its
tokenizer and its data preparation.

The transform lowercases ASCII letters and marks case with four private-use operators, one SentencePiece piece each:
TITLE (U+E001) capitalises the first letter of a word, ALLCAPS (U+E002) a whole word of 2+ letters, CAPNEXT (U+E003)
the next letter, and ESC (U+E004) makes the next character literal (so text that already holds an operator survives).
A word is a maximal run of ASCII letters: "The NASA iPhone" -> TITLE "the " ALLCAPS "nasa i" CAPNEXT "phone".
Upstream calls it lossless_caps_caseops_v1 (= encode_lossless_caps_v2); this is our own implementation, held to
upstream's outputs by tests/golden/caseops_transform.json.

BPB stays scored on the original text through the byte sidecar: for each validation token, the number of UTF-8
bytes of the ORIGINAL document it stands for (operators 0, BOS 0), stored like a token shard.

Usage (writes token shards, fineweb_val_bytes_*.bin and caseops_manifest.json into --out):
    python data/caseops.py proxy   [--src ../shared/proxy] [--out DIR] [--vocab 8192 | --tokenizer MODEL]
    python data/caseops.py fineweb --docs docs_selected.jsonl [--out DIR] [--val-docs 50000] [--vocab 8192 | ...]
"""
import argparse
import glob
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from multiprocessing import Pool

import numpy as np
import sentencepiece as spm
import zstandard
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.make_sample import train_tokenizer  # noqa: E402
from data.shards import BOS_ID, HEADER_INTS, MAGIC, VERSION, write_shard  # noqa: E402

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
TRANSFORM = "lossless_caps_caseops_v1"  # upstream's name, recorded in the manifest
MANIFEST = "caseops_manifest.json"
FINEWEB_VAL_DOCS = 50_000  # the validation documents upstream's evaluation scores (the head of docs_selected.jsonl)
TOKENIZER_DOCS = 20_000
BATCH_DOCS = 256


class CaseOpsError(ValueError):
    """A user-facing problem, stated in one line with its fix."""


# ---- the transform ------------------------------------------------------------------------------------------------

_WORD_OR_OPERATOR = re.compile("[A-Za-z]+|[\ue001-\ue004]")
_ENCODED_UNIT = re.compile("\ue004(.)|\ue002([a-z]+)|(\ue001?)((?:\ue003?[a-z])+)", re.DOTALL)


def _encode_word(match) -> str:
    word = match.group()
    if word in OPERATORS:
        return ESC + word
    if len(word) > 1 and word.isupper():
        return ALLCAPS + word.lower()
    # lowercase, TitleCase and mixed words: TITLE for a capital first letter, CAPNEXT before each later capital
    head = TITLE + word[0].lower() if word[0].isupper() else word[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text`: no ASCII capital is left, and decode() gives `text` back exactly."""
    return _WORD_OR_OPERATOR.sub(_encode_word, text)


def _decode_unit(match) -> str:
    literal, allcaps, title, letters = match.groups()
    if literal is not None:
        return literal
    if allcaps is not None:
        return allcaps.upper()
    word = re.sub("\ue003([a-z])", lambda m: m.group(1).upper(), letters)
    return word[0].upper() + word[1:] if title else word


def decode(transformed: str) -> str:
    """The text whose encode() is `transformed`; raises ValueError for any string encode() cannot produce (an
    operator out of place, a capital letter, ALLCAPS on one letter), so that decode and encode are inverse."""
    text = _ENCODED_UNIT.sub(_decode_unit, transformed)
    if encode(text) != transformed:
        raise ValueError("not a CaseOps encoding: an operator is out of place or an ASCII capital is present")
    return text


# ---- the byte sidecar ---------------------------------------------------------------------------------------------

def char_original_bytes(transformed: str) -> np.ndarray:
    """For each character of an encoded text, the UTF-8 bytes of the original text it stands for: 0 for an
    operator, 3 for an escaped (literal) operator character, and its own UTF-8 length for anything else (a
    lowercased ASCII letter is 1 byte either way). Sums to len(decode(transformed).encode())."""
    codes = np.frombuffer(transformed.encode("utf-32-le"), dtype="<u4")
    nbytes = 1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000)
    operator = (codes >= 0xE001) & (codes <= 0xE004)
    if ESC in transformed:  # ESC X: X is literal, even when X is ESC itself
        i = 0
        while (i := transformed.find(ESC, i)) >= 0 and i + 1 < len(transformed):
            operator[i + 1] = False
            i += 2
    return np.where(operator, 0, nbytes).astype(np.int64)


def token_byte_counts(transformed: str, spans) -> np.ndarray:
    """Original UTF-8 bytes per token of one document, from SentencePiece's alignment: `spans[k]` = (begin, end),
    in characters of `transformed`, is the input span token k came from.

    Token k carries the original bytes of transformed[ends[k-1]:ends[k]] (operators 0, see char_original_bytes):
    upstream's rule (its surface_piece_original_byte_counts over each piece's surface), with one change. The
    tokenizer's nmt_nfkc normalizer drops leading and trailing whitespace, which no span covers and upstream leaves
    uncounted; here they go to the first and the last token that carry bytes (never to an operator). So the counts
    always sum to the original document's UTF-8 bytes, the BPB denominator, for a document with at least one token.

    What the normalizer rewrites inside a document (a newline or a run of spaces becomes one space, NFKC folds
    "…" to "...", control characters vanish) stays counted at its original size, on the token whose span holds
    it: the model predicts the normalized text, but the denominator is the original document, as upstream's (so
    sp.decode(ids) is not the transformed text in general). A character split into byte-fallback pieces has all
    its bytes on the last of those pieces, where SentencePiece's alignment puts it.
    """
    if len(spans) == 0:
        return np.zeros(0, np.int64)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    begin, ends = spans[0, 0], spans[:, 1]
    if np.any(np.diff(ends) < 0) or not 0 <= begin <= ends[0] or ends[-1] > len(transformed):
        raise ValueError("token spans must end in order inside the text")
    cum = np.concatenate([[0], np.cumsum(char_original_bytes(transformed))])
    counts = np.diff(cum[ends], prepend=cum[begin])
    carriers = np.flatnonzero(counts) if counts.any() else [0]
    counts[carriers[0]] += cum[begin]
    counts[carriers[-1]] += cum[-1] - cum[ends[-1]]
    return counts


def encode_with_spans(sp, texts) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, input span of each token in characters) of each text. SentencePiece 0.2.3 gives the alignment as an
    offset mapping; 0.1.99 to 0.2.1 as immutable protos (upstream's path). Both give the same spans."""
    if hasattr(sp, "encode_as_immutable_proto"):
        out = []
        for text in texts:
            pieces = sp.encode_as_immutable_proto(text).pieces
            for p in pieces:
                assert text[p.begin:p.end] == p.surface, "span offsets are not character offsets"
            out.append(([p.id for p in pieces], [(p.begin, p.end) for p in pieces]))
        return out
    return [(r["ids"], r["offsets"]) for r in sp.encode(list(texts), out_type="offset_mapping")]


def check_tokenizer(sp, path) -> None:
    """Raises CaseOpsError unless each operator is one piece of its own and bytes fall back to byte pieces."""
    for op in OPERATORS:
        if sp.encode(op) != [sp.piece_to_id(op)] or sp.piece_to_id(op) == sp.unk_id():
            raise CaseOpsError(f"{path}: operator U+{ord(op):04X} is not a piece of its own; use a tokenizer "
                               "trained by data/caseops.py (or upstream's *_caseops_v1_reserved.model)")
    if sp.bos_id() != BOS_ID or sum(map(sp.is_byte, range(sp.vocab_size()))) != 256:
        raise CaseOpsError(f"{path}: needs bos id {BOS_ID} and 256 byte-fallback pieces; train it with data/caseops.py")


def train_caseops_tokenizer(texts, prefix, vocab_size, **overrides) -> spm.SentencePieceProcessor:
    """The upstream spec (make_sample.SPM_SETTINGS) on encoded text, the operators reserved as pieces 4-7."""
    return train_tokenizer(map(encode, texts), prefix, vocab_size, user_defined_symbols=list(OPERATORS), **overrides)


_sp = None  # one SentencePieceProcessor per worker


def _init_worker(model_path):
    global _sp
    _sp = spm.SentencePieceProcessor(model_file=model_path)


def _val_batch(texts) -> dict:
    """[BOS] + ids per document, the matching sidecar (BOS 0), the documents' UTF-8 bytes, and those no token can
    carry (a document the normalizer empties, such as whitespace only, has no token)."""
    transformed = [encode(t) for t in texts]
    tokens, sidecar, unscored = [], [], 0
    for text, enc, (ids, spans) in zip(texts, transformed, encode_with_spans(_sp, transformed)):
        counts = token_byte_counts(enc, spans)
        raw = len(text.encode("utf-8"))
        assert not ids or counts.sum() == raw, "sidecar total differs from the document's bytes"
        unscored += 0 if ids else raw
        if counts.size and counts.max() >= 2**16:
            raise CaseOpsError("a token carries 65536+ bytes (a huge run of edge whitespace); strip that document")
        tokens += [BOS_ID, *ids]
        sidecar += [0, *counts.tolist()]
    return dict(docs=len(texts), tokens=np.array(tokens, np.uint16), sidecar=np.array(sidecar, np.uint16),
                text_bytes=sum(len(t.encode("utf-8")) for t in texts), unscored=unscored)


def _train_batch(texts) -> tuple[int, np.ndarray]:
    ids = _sp.encode([encode(t) for t in texts])
    return len(texts), np.concatenate([np.array([BOS_ID, *doc], np.uint16) for doc in ids])


# ---- shards and the manifest --------------------------------------------------------------------------------------

class ShardWriter:
    """Streams uint16 values into OUT/fineweb_<kind>_000000.bin, ... (upstream shard format) of at most
    shard_tokens each, and records each file's name, token count and SHA-256."""

    def __init__(self, out_dir, kind, shard_tokens):
        self.out_dir, self.kind, self.shard_tokens = out_dir, kind, shard_tokens
        self.buffer, self.pending, self.files, self.total = [], 0, [], 0

    def add(self, values: np.ndarray) -> None:
        self.buffer.append(values)
        self.pending += len(values)
        self.total += len(values)
        if self.pending >= self.shard_tokens:
            joined = np.concatenate(self.buffer)
            cut = self.pending - self.pending % self.shard_tokens
            for start in range(0, cut, self.shard_tokens):
                self._write(joined[start:start + self.shard_tokens])
            self.buffer, self.pending = [joined[cut:]], self.pending - cut

    def close(self) -> list[dict]:
        rest = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.uint16)
        if len(rest) or not self.files:
            self._write(rest)
        return self.files

    def _write(self, values):
        name = f"fineweb_{self.kind}_{len(self.files):06d}.bin"
        write_shard(os.path.join(self.out_dir, name), values)
        self.files.append(dict(name=name, tokens=len(values), sha256=sha256_file(os.path.join(self.out_dir, name))))


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_values(path) -> np.ndarray:
    """The uint16 payload of one shard (token or sidecar), after checking its header and size."""
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != MAGIC or header[1] != VERSION:
        raise CaseOpsError(f"{path}: not a shard in the upstream format; regenerate it with data/caseops.py")
    values = np.fromfile(path, dtype="<u2", offset=4 * HEADER_INTS)
    if values.size != header[2]:
        raise CaseOpsError(f"{path}: holds {values.size} values, its header says {header[2]}; regenerate it")
    return values


def val_token_files(data_dir) -> list[str]:
    """fineweb_val_*.bin without the sidecar: upstream names the sidecar fineweb_val_bytes_*.bin, which the glob
    fineweb_val_*.bin also matches (and sorts after the token shards)."""
    return sorted(p for p in glob.glob(os.path.join(data_dir, "fineweb_val_*.bin"))
                  if not os.path.basename(p).startswith("fineweb_val_bytes_"))


def sidecar_files(data_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(data_dir, "fineweb_val_bytes_*.bin")))


def require_complete(manifest) -> None:
    if not manifest.get("complete"):
        raise CaseOpsError("the data preparation did not finish (manifest incomplete); rerun data/caseops.py")


def check_split(manifest: dict, val_doc_count: int, expected_val_docs: int | None = None) -> None:
    """Raises CaseOpsError unless training on the manifest's train shards cannot have seen a document of the
    validation stream a run scores, which holds `val_doc_count` documents (its BOS count).

    In the source order (validation documents first), the first training document must come after every
    validation document, and the validation stream must be exactly the manifest's. The leak this stops: an
    upstream prep script defaulted to 10,000 validation documents while evaluation scored 50,000, so 40,000
    scored documents were in the train shards. `expected_val_docs` (50,000 for FineWeb) pins the count."""
    require_complete(manifest)
    val_docs, first_train = manifest["val_docs"], manifest["train_first_doc"]
    if first_train < val_docs or first_train < val_doc_count:
        raise CaseOpsError(f"train shards start at document {first_train}, inside the {max(val_docs, val_doc_count)} "
                           "validation documents: they overlap; rerun data/caseops.py with the right --val-docs")
    if val_doc_count != val_docs:
        raise CaseOpsError(f"the validation shards hold {val_doc_count} documents but the manifest says {val_docs}; "
                           "the shards and manifest come from different preparations, regenerate them")
    if expected_val_docs is not None and val_docs != expected_val_docs:
        raise CaseOpsError(f"the data holds {val_docs} validation documents, the evaluation expects "
                           f"{expected_val_docs}; rerun data/caseops.py with --val-docs {expected_val_docs}")


def verify_data_dir(data_dir, expected_val_docs: int | None = None, tokenizer_path=None) -> dict:
    """Everything a training run should check before it trains on data_dir; returns the manifest.
    The files on disk must be the manifest's (names, SHA-256 of val tokens and sidecar, sizes of train shards, no
    extra shards; the tokenizer's SHA-256 when given), the sidecar must match the val tokens one for one (0 at
    each BOS, total = sidecar_bytes), and check_split must pass on the BOS count of the val tokens."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CaseOpsError(f"{path} not found; prepare the data with data/caseops.py")
    with open(path) as f:
        manifest = json.load(f)
    require_complete(manifest)
    on_disk = dict(val=val_token_files(data_dir), val_bytes=sidecar_files(data_dir),
                   train=sorted(glob.glob(os.path.join(data_dir, "fineweb_train_*.bin"))))
    for kind, paths in on_disk.items():
        listed = manifest["files"][kind]
        if [os.path.basename(p) for p in paths] != [f["name"] for f in listed]:
            raise CaseOpsError(f"{data_dir}: the {kind} shards on disk are not the manifest's; regenerate the folder")
        for p, f in zip(paths, listed):
            hash_differs = kind != "train" and sha256_file(p) != f["sha256"]  # train shards: sizes only (GBs)
            if os.path.getsize(p) != 4 * HEADER_INTS + 2 * f["tokens"] or hash_differs:
                raise CaseOpsError(f"{p}: differs from the manifest (size or SHA-256); regenerate the folder")
    if tokenizer_path and sha256_file(tokenizer_path) != manifest["tokenizer"]["sha256"]:
        raise CaseOpsError(f"{tokenizer_path} is not the tokenizer the data was made with "
                           f"({manifest['tokenizer']['file']}); point TOKENIZER_PATH at that one")
    tokens = np.concatenate([read_values(p) for p in on_disk["val"]])
    sidecar = np.concatenate([read_values(p) for p in on_disk["val_bytes"]])
    bos = tokens == BOS_ID
    total = int(sidecar.sum(dtype=np.int64))
    if len(sidecar) != len(tokens) or sidecar[bos].any() or total != manifest["sidecar_bytes"]:
        raise CaseOpsError(f"{data_dir}: the byte sidecar does not match the val tokens; regenerate the folder")
    check_split(manifest, int(bos.sum()), expected_val_docs)
    return manifest


# ---- data preparation ---------------------------------------------------------------------------------------------

def read_texts(path):
    """The "text" of each line of a .jsonl or .jsonl.zst file, streamed."""
    with open(path, "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw) if path.endswith(".zst") else raw
        for n, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), 1):
            if line.strip():
                try:
                    yield json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise CaseOpsError(f"{path} line {n}: not a JSON object with a \"text\" field; give a JSON Lines "
                                       "file of {\"text\": ...} objects") from None


def batches(texts, size=BATCH_DOCS):
    it = iter(texts)
    while batch := list(itertools.islice(it, size)):
        yield batch


def progress(desc, total, iterable=None):
    """A tqdm bar counting documents, shown only when stderr is a terminal."""
    return tqdm(iterable, desc=desc, total=total, unit="doc", disable=not sys.stderr.isatty())


def claim_out_dir(out_dir, settings) -> None:
    """Makes out_dir ready for a run with `settings`: refuses a folder made with other settings or holding shards
    no manifest describes, then deletes the previous run's shards and marks the manifest incomplete."""
    path = os.path.join(out_dir, MANIFEST)
    shards = glob.glob(os.path.join(out_dir, "fineweb_*.bin"))
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f).get("settings")
        if old != settings:
            changed = sorted(k for k in set(old or {}) | set(settings) if (old or {}).get(k) != settings.get(k))
            raise CaseOpsError(f"{out_dir} holds CaseOps data made with other settings ({', '.join(changed)}); "
                               "choose another --out or delete that folder")
    elif shards:
        raise CaseOpsError(f"{out_dir} holds shards that no {MANIFEST} describes; choose another --out or delete them")
    os.makedirs(out_dir, exist_ok=True)
    for p in shards:
        os.remove(p)
    write_manifest(out_dir, dict(settings=settings, complete=False))


def write_manifest(out_dir, manifest) -> None:
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as f:
        json.dump(manifest, f, indent=1)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile makes it private
    os.replace(f.name, os.path.join(out_dir, MANIFEST))


def make_tokenizer(opts, train_texts) -> str:
    """opts.tokenizer copied into opts.out, or a BPE trained on the first opts.tokenizer_docs training documents
    (reused when the folder already holds it: the settings match, or claim_out_dir would have refused)."""
    if opts.tokenizer:
        path = os.path.join(opts.out, os.path.basename(opts.tokenizer))
        if os.path.abspath(opts.tokenizer) != os.path.abspath(path):
            shutil.copyfile(opts.tokenizer, path)
    else:
        path = os.path.join(opts.out, f"fineweb_{opts.vocab}_bpe_{TRANSFORM}.model")
        if not os.path.isfile(path):
            texts = list(progress("tokenizer docs", opts.tokenizer_docs,
                                  itertools.islice(train_texts, opts.tokenizer_docs)))
            if not texts:
                raise CaseOpsError(f"no training documents to train the tokenizer on (at most --val-docs "
                                   f"{opts.val_docs} documents in the source); lower --val-docs or check the source")
            train_caseops_tokenizer(texts, path.removesuffix(".model"), opts.vocab, num_threads=opts.workers)
    check_tokenizer(spm.SentencePieceProcessor(model_file=path), path)
    return path


def prepare(opts, val_texts, train_texts, tokenizer_texts, train_first_doc, sources) -> dict:
    """Tokenizer, val shards + sidecar, train shards and the manifest in opts.out; returns the manifest.
    `val_texts` must hold at least opts.val_docs documents; the training documents (`train_texts`) start at
    index `train_first_doc` of the source order, which puts the validation documents first."""
    settings = dict(transform=TRANSFORM, sources=sources, val_docs=opts.val_docs, shard_tokens=opts.shard_tokens,
                    max_train_docs=opts.max_train_docs, tokenizer=opts.tokenizer and os.path.abspath(opts.tokenizer),
                    vocab=None if opts.tokenizer else opts.vocab,
                    tokenizer_docs=None if opts.tokenizer else opts.tokenizer_docs)
    claim_out_dir(opts.out, settings)
    model = make_tokenizer(opts, tokenizer_texts)
    writers = {kind: ShardWriter(opts.out, kind, opts.shard_tokens) for kind in ("val", "val_bytes", "train")}
    totals = dict(val_docs=0, val_text_bytes=0, unscored_bytes=0, train_docs=0)
    pool = Pool(opts.workers, _init_worker, (model,)) if opts.workers > 1 else None
    if pool is None:
        _init_worker(model)
    imap = pool.imap if pool else map
    try:
        with progress("val docs", opts.val_docs) as bar:
            for r in imap(_val_batch, batches(itertools.islice(val_texts, opts.val_docs))):
                writers["val"].add(r["tokens"])
                writers["val_bytes"].add(r["sidecar"])
                totals["val_docs"] += r["docs"]
                totals["val_text_bytes"] += r["text_bytes"]
                totals["unscored_bytes"] += r["unscored"]
                bar.update(r["docs"])
        if totals["val_docs"] < opts.val_docs:
            raise CaseOpsError(f"the source holds only {totals['val_docs']} validation documents, fewer than "
                               f"--val-docs {opts.val_docs}; lower --val-docs or check the source")
        with progress("train docs", opts.max_train_docs) as bar:
            for n, tokens in imap(_train_batch, batches(itertools.islice(train_texts, opts.max_train_docs))):
                writers["train"].add(tokens)
                totals["train_docs"] += n
                bar.update(n)
    finally:
        if pool:
            pool.terminate()
    if totals["train_docs"] == 0:
        raise CaseOpsError("no training documents are left after the validation documents; check the source")
    files = {kind: w.close() for kind, w in writers.items()}
    sidecar_bytes = sum(int(read_values(os.path.join(opts.out, f["name"])).sum(dtype=np.int64))
                        for f in files["val_bytes"])
    assert sidecar_bytes + totals["unscored_bytes"] == totals["val_text_bytes"]
    sp = spm.SentencePieceProcessor(model_file=model)
    manifest = dict(
        transform=TRANSFORM, operators={name: f"U+{ord(op):04X}" for name, op in zip(
            ("TITLE", "ALLCAPS", "CAPNEXT", "ESC"), OPERATORS)},
        settings=settings, complete=True, val_docs=totals["val_docs"], train_first_doc=train_first_doc,
        train_docs=totals["train_docs"], val_tokens=writers["val"].total, train_tokens=writers["train"].total,
        val_text_bytes=totals["val_text_bytes"], sidecar_bytes=sidecar_bytes, unscored_bytes=totals["unscored_bytes"],
        tokenizer=dict(file=os.path.basename(model), sha256=sha256_file(model), vocab_size=sp.vocab_size()),
        files=files)
    write_manifest(opts.out, manifest)
    return manifest


def prepare_proxy(opts) -> dict:
    """The proxy corpus: val = text/val_docs.jsonl.zst (the first --val-docs of it, all by default), train =
    text/docs_*.jsonl.zst in name order. In the source order (val file, then train files) training starts after
    the whole val file."""
    val_file = os.path.join(opts.src, "text", "val_docs.jsonl.zst")
    train_files = sorted(glob.glob(os.path.join(opts.src, "text", "docs_*.jsonl.zst")))
    if not os.path.isfile(val_file) or not train_files:
        raise CaseOpsError(f"{opts.src}: no text/val_docs.jsonl.zst or text/docs_*.jsonl.zst; point --src at the "
                           "proxy corpus folder (../shared/proxy)")
    val_file_docs = sum(1 for _ in read_texts(val_file))
    if opts.val_docs is None:
        opts.val_docs = val_file_docs
    train = lambda: itertools.chain.from_iterable(map(read_texts, train_files))  # noqa: E731
    sources = dict(val=os.path.abspath(val_file), train=[os.path.abspath(f) for f in train_files])
    return prepare(opts, read_texts(val_file), train(), train(), val_file_docs, sources)


def prepare_fineweb(opts) -> dict:
    """docs_selected.jsonl: its first --val-docs documents are validation, the rest train, in file order."""
    if not os.path.isfile(opts.docs):
        raise CaseOpsError(f"{opts.docs} not found; point --docs at docs_selected.jsonl (upstream's "
                           "data/download_hf_docs_and_tokenize.py fetches it)")
    stream = read_texts(opts.docs)  # validation takes the head; training continues the same stream
    tokenizer_texts = itertools.islice(read_texts(opts.docs), opts.val_docs, None)
    return prepare(opts, stream, stream, tokenizer_texts, opts.val_docs, dict(docs=os.path.abspath(opts.docs)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="corpus", required=True)
    proxy = sub.add_parser("proxy", help="the proxy corpus (../shared/proxy)")
    proxy.add_argument("--src", default=os.path.join("..", "shared", "proxy"))
    proxy.add_argument("--val-docs", type=int, default=None, help="default: the whole val file")
    fineweb = sub.add_parser("fineweb", help="upstream's docs_selected.jsonl")
    fineweb.add_argument("--docs", required=True, help="docs_selected.jsonl (or .jsonl.zst)")
    fineweb.add_argument("--val-docs", type=int, default=FINEWEB_VAL_DOCS)
    for q in (proxy, fineweb):
        q.add_argument("--out", default=None, help="default bench_data/<corpus>_caseops_sp<vocab>")
        q.add_argument("--tokenizer", default=None, help="an existing CaseOps SentencePiece model (else train one)")
        q.add_argument("--vocab", type=int, default=8192)
        q.add_argument("--tokenizer-docs", type=int, default=TOKENIZER_DOCS, help="train docs the BPE learns from")
        q.add_argument("--max-train-docs", type=int, default=None)
        q.add_argument("--shard-tokens", type=int, default=10**8)
        q.add_argument("--workers", type=int, default=os.cpu_count())
    opts = p.parse_args(argv)
    if opts.val_docs is not None and opts.val_docs < 1:
        p.error("--val-docs must be at least 1")
    if opts.tokenizer and not os.path.isfile(opts.tokenizer):
        p.error(f"--tokenizer {opts.tokenizer} not found")
    if not 264 < opts.vocab <= 65536:
        p.error("--vocab must be in (264, 65536]: 4 specials + 4 operators + 256 bytes + merges, ids fitting uint16")
    opts.out = opts.out or os.path.join("bench_data", f"{opts.corpus}_caseops_sp{opts.vocab}")
    try:
        manifest = (prepare_proxy if opts.corpus == "proxy" else prepare_fineweb)(opts)
    except CaseOpsError as e:
        sys.exit(f"caseops: {e}")
    print(f"wrote {opts.out}: {manifest['val_docs']} val docs, {manifest['val_tokens']:,} val tokens, "
          f"{manifest['sidecar_bytes']:,} sidecar bytes of {manifest['val_text_bytes']:,} text bytes; "
          f"{manifest['train_docs']} train docs, {manifest['train_tokens']:,} train tokens")


if __name__ == "__main__":
    main()
