"""Downloads the challenge's tokenized FineWeb from the Hugging Face hub into ./data, checking every file.

Usage: python data/download.py --variant sp1024|sp8192|caseops [--train-shards N] [--data-root data] [--mirror DIR]

Variants (each repository holds `datasets/datasets/<dataset>/fineweb_{train,val}_NNNNNN.bin` and
`datasets/tokenizers/<tokenizer>`, the layout of upstream's data/cached_challenge_fineweb.py):
  sp1024   willdepueoai/parameter-golf         the challenge's 1024-piece tokenizer (PRESET=baseline, seed162)
  sp8192   kevclark/parameter-golf             8192 pieces (the default stack)
  caseops  romeerp/parameter-golf-caseops-v1   8192 pieces on case-operator text (the #1855 SOTA line), with the
                                               validation byte sidecar fineweb_val_bytes_NNNNNN.bin

What it guarantees:
- Resumable: a file already in place with the hub's size and a sound header is kept; an interrupted file is
  resumed (the hub library keeps the partial bytes); nothing half-written ever has a final name (`.part` first).
- Checked: every shard's header (magic, version, token count matching the file size) and, where the hub lists
  one, its SHA-256; the tokenizer's vocabulary size; for CaseOps, one sidecar per validation shard with the same
  token count and 0 bytes at every BOS.
- Canonical validation: the validation split must hold the canonical 50,000 documents (and, where a record's log
  gives it, the canonical target count). A train shard in which validation documents appear (8 in a row, or more
  than 1% of its documents) is refused and not placed: training on it would score validation text already seen.
- The last line gives the token counts and the DATA_PATH / TOKENIZER_PATH / VOCAB_SIZE to export.

--mirror DIR reads a local folder laid out like the hub repository (an offline copy) instead of the network.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "download.py"
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS
BOS_ID = 1
REMOTE_ROOT = "datasets"  # every repository keeps its export under this folder (upstream's REMOTE_ROOT_PREFIX)
SHARD_NAME = re.compile(r"^fineweb_(train|val|val_bytes)_(\d{6})\.bin$")
# A train shard is refused when this many validation documents follow each other in it (the fingerprint of an
# export that cut validation short: #2127), or when more than this fraction of its documents are validation ones.
# Isolated exact duplicates between the splits (the same page in two crawls) stay below both.
OVERLAP_RUN, OVERLAP_FRAC = 8, 0.01
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    repo_id: str
    dataset: str  # folder of the shards: ./data/datasets/<dataset> is the DATA_PATH
    tokenizer: str  # file name in ./data/tokenizers: the TOKENIZER_PATH
    vocab: int
    sidecar: bool = False  # CaseOps: per-token original byte counts of the validation tokens
    val_docs: int = 50_000  # the first 50,000 documents of the stream are validation (upstream export)
    val_targets: tuple | None = None  # (targets, seq_len) as a record's log prints them: ((N-1)//seq_len)*seq_len


VARIANTS = {
    "sp1024": Variant("sp1024", "willdepueoai/parameter-golf", "fineweb10B_sp1024", "fineweb_1024_bpe.model", 1024,
                      val_targets=(62_021_632, 1024)),  # every sp1024 record's `val_loader:... tokens:62021632`
    "sp8192": Variant("sp8192", "kevclark/parameter-golf", "fineweb10B_sp8192", "fineweb_8192_bpe.model", 8192),
    "caseops": Variant("caseops", "romeerp/parameter-golf-caseops-v1",
                       "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                       "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", 8192, sidecar=True,
                       val_targets=(47_851_520, 2048)),  # #1855's logs: `val_tokens: 47851520` at seq 2048
}


class DownloadError(Exception):
    """One line naming the problem and the fix."""


@dataclasses.dataclass
class RemoteFile:
    path: str  # path in the repository
    size: int
    sha256: str | None = None


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar on stderr, silent when stderr is not a terminal (logs, CI, tests)."""
    return tqdm(**kwargs, disable=not sys.stderr.isatty(), file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------------
# Where the files come from: the hub, or a local folder laid out like it

class LocalRepo:
    """A folder laid out like the hub repository (an offline copy, or a test fixture)."""

    def __init__(self, root):
        self.root, self.name = root, root
        if not os.path.isdir(root):
            raise DownloadError(f"--mirror {root}: not a folder; give a folder laid out like the hub repository "
                                f"(holding {REMOTE_ROOT}/datasets/ and {REMOTE_ROOT}/tokenizers/)")

    def files(self, folder) -> dict[str, RemoteFile]:
        full = os.path.join(self.root, folder)
        names = sorted(os.listdir(full)) if os.path.isdir(full) else []
        return {f"{folder}/{n}": RemoteFile(f"{folder}/{n}", os.path.getsize(os.path.join(full, n)))
                for n in names if os.path.isfile(os.path.join(full, n))}

    def fetch(self, remote: RemoteFile, part: str) -> None:
        """Copies into `part`, resuming after the bytes an interrupted copy left there."""
        done = os.path.getsize(part) if os.path.exists(part) else 0
        if done > remote.size:
            os.remove(part)
            done = 0
        with open(os.path.join(self.root, remote.path), "rb") as src, open(part, "ab") as dst, \
                progress_bar(total=remote.size, initial=done, unit="B", unit_scale=True,
                             desc=os.path.basename(remote.path)) as bar:
            src.seek(done)
            while chunk := self.read(src):
                dst.write(chunk)
                bar.update(len(chunk))

    def read(self, src) -> bytes:  # one chunk; tests interrupt a copy here
        return src.read(CHUNK)


class HubRepo:
    """A dataset repository on the Hugging Face hub (huggingface_hub, the library the records use)."""

    def __init__(self, repo_id, staging):
        try:
            import huggingface_hub
        except ImportError:
            raise DownloadError("huggingface_hub is not installed; pip install -r requirements.txt "
                                "(or pip install huggingface_hub)") from None
        self.hub, self.api = huggingface_hub, huggingface_hub.HfApi()
        self.repo_id = self.name = repo_id
        self.staging = staging  # the library downloads here (and keeps partial bytes here), then we move the file

    def _fail(self, what, e) -> DownloadError:
        first = (str(e).strip().splitlines() or [""])[0][:120]
        return DownloadError(f"{what} {self.repo_id} on the Hugging Face hub failed ({type(e).__name__}: {first}); "
                             "check the network, HF_ENDPOINT and HF_TOKEN, or use --mirror DIR")

    def files(self, folder) -> dict[str, RemoteFile]:
        try:
            entries = list(self.api.list_repo_tree(self.repo_id, folder, repo_type="dataset"))
        except Exception as e:  # the library's errors (not found, HTTP, connection) all end the same way
            if type(e).__name__ == "EntryNotFoundError":
                return {}
            raise self._fail("listing", e) from None
        return {e.path: RemoteFile(e.path, e.size, e.lfs.sha256 if getattr(e, "lfs", None) else None)
                for e in entries if hasattr(e, "size")}

    def fetch(self, remote: RemoteFile, part: str) -> None:
        class Bar(tqdm):  # the library's per-file bar, silent off a terminal
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = kwargs.get("disable") or not sys.stderr.isatty()
                super().__init__(*args, **kwargs)

        try:
            got = self.hub.hf_hub_download(self.repo_id, remote.path, repo_type="dataset", local_dir=self.staging,
                                           tqdm_class=Bar)
        except Exception as e:
            raise self._fail(f"downloading {remote.path} from", e) from None
        os.replace(got, part)


# ----------------------------------------------------------------------------------------------------------------------
# Checks

def shard_problem(path) -> str | None:
    """What is wrong with a shard's header or size, or None for a sound shard."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS) if size >= HEADER_BYTES else np.zeros(0)
    if len(header) < HEADER_INTS or header[0] != MAGIC or header[1] != VERSION:
        return "not a shard (bad header: magic/version); it is corrupt"
    if size != HEADER_BYTES + 2 * int(header[2]):
        return (f"header says {int(header[2]):,} tokens ({HEADER_BYTES + 2 * int(header[2]):,} bytes) but the file "
                f"has {size:,} bytes; it is truncated or corrupt")
    return None


def read_tokens(path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def documents(tokens) -> list[tuple[int, int]]:
    """(start, end) of each document: from one BOS to the next. Tokens before a shard's first BOS (the tail of a
    document cut at the previous shard) are no document."""
    starts = np.flatnonzero(tokens == BOS_ID)
    return list(zip(starts.tolist(), np.append(starts[1:], len(tokens)).tolist()))


def doc_hashes(tokens) -> list[bytes]:
    raw = memoryview(np.ascontiguousarray(tokens, dtype="<u2").tobytes())
    return [hashlib.blake2b(raw[2 * s:2 * e], digest_size=12).digest() for s, e in documents(tokens)]


def check_tokenizer(path, vocab) -> None:
    import sentencepiece as spm
    try:
        n = spm.SentencePieceProcessor(model_file=path).vocab_size()
    except (RuntimeError, OSError):
        raise DownloadError(f"{path}: not a SentencePiece model; it is corrupt, delete it and rerun") from None
    if n != vocab:
        raise DownloadError(f"{path}: {n} pieces, expected {vocab}; the repository holds another tokenizer")


def check_val(variant, val_parts, sidecar_parts) -> int:
    """The validation split (its shards' tokens, in order) is the canonical one, and each CaseOps sidecar matches its
    shard; returns the document count."""
    tokens = np.concatenate(val_parts)
    n_docs = int((tokens == BOS_ID).sum())
    found, problem = f"{n_docs:,} documents", n_docs != variant.val_docs
    canon = f"{variant.val_docs:,} documents"
    if variant.val_targets:
        want, seq = variant.val_targets
        targets = (len(tokens) - 1) // seq * seq
        found += f", {targets:,} targets at length {seq}"
        canon += f", {want:,} targets"
        problem = problem or targets != want
    if problem:
        raise DownloadError(f"the validation split has {found}, not the canonical {canon}: an export with another "
                            "split trains on validation documents; use the canonical repository")
    for i, (part, counts) in enumerate(zip(val_parts, sidecar_parts)):
        name = f"fineweb_val_bytes_{i:06d}.bin"
        if len(counts) != len(part):
            raise DownloadError(f"{name} has {len(counts):,} entries for {len(part):,} validation tokens; "
                                "the sidecar belongs to another export")
        if counts[part == BOS_ID].any():
            raise DownloadError(f"{name} gives bytes to BOS tokens (it must give 0); the sidecar belongs to another "
                                "export or is corrupt")
    return n_docs


def check_overlap(name, tokens, val_hashes) -> None:
    """Refuses a train shard holding validation documents (see OVERLAP_RUN, OVERLAP_FRAC)."""
    hits = [h in val_hashes for h in doc_hashes(tokens)]
    run = longest = 0
    for hit in hits:
        run = run + 1 if hit else 0
        longest = max(longest, run)
    if hits and (longest >= OVERLAP_RUN or sum(hits) > OVERLAP_FRAC * len(hits)):
        raise DownloadError(f"{name} holds {sum(hits):,} validation documents ({longest} in a row) of its "
                            f"{len(hits):,}: training on it would train on validation text; refused (not placed), "
                            "use the canonical repository")


# ----------------------------------------------------------------------------------------------------------------------
# Download

@dataclasses.dataclass
class Item:
    remote: RemoteFile
    dest: str

    @property
    def part(self) -> str:
        return self.dest + ".part"


class Downloader:
    def __init__(self, repo, log=print):
        self.repo, self.log = repo, log
        self.fetched = self.kept = 0

    def ensure(self, item: Item, shard=True) -> str:
        """A checked copy of the file: its final path when one is already in place (right size, sound header),
        else a freshly fetched `.part` for the caller to place once its contents pass."""
        name = os.path.basename(item.dest)
        if os.path.exists(item.dest):
            size = os.path.getsize(item.dest)
            why = f"size {size:,}, expected {item.remote.size:,}" if size != item.remote.size else None
            if not why and shard:
                why = shard_problem(item.dest)
            if not why:
                self.kept += 1
                return item.dest
            self.log(f"{name}: downloading again ({why})")
            os.remove(item.dest)
        os.makedirs(os.path.dirname(item.dest), exist_ok=True)
        self.repo.fetch(item.remote, item.part)
        self.fetched += 1
        fix = f"rerun to download it again; if it fails again, the copy in {self.repo.name} is bad"
        size = os.path.getsize(item.part)
        problem = None
        if size != item.remote.size:
            problem = f"{size:,} bytes arrived, {item.remote.size:,} expected"
        elif item.remote.sha256 and sha256_of(item.part) != item.remote.sha256:
            problem = "its SHA-256 is not the one the hub lists"
        elif shard:
            problem = shard_problem(item.part)
        if problem:
            os.remove(item.part)
            raise DownloadError(f"{item.remote.path} from {self.repo.name}: {problem}; {fix}")
        return item.part


def place(path, item: Item) -> None:
    if path != item.dest:
        os.replace(path, item.dest)


def listing(repo, variant):
    """(tokenizer, val, sidecars, train) as RemoteFiles, numbered shards in order; one line if the layout is off."""
    folder = f"{REMOTE_ROOT}/datasets/{variant.dataset}"
    files = repo.files(folder)
    if not files:
        raise DownloadError(f"{repo.name} has no {folder}/; check --variant (or --repo-id / --mirror)")
    shards = {"train": {}, "val": {}, "val_bytes": {}}
    for path, f in files.items():
        m = SHARD_NAME.match(os.path.basename(path))
        if m:
            shards[m[1]][int(m[2])] = f
    numbered = {kind: [got[i] for i in range(len(got)) if i in got] for kind, got in shards.items()}
    for kind, got in shards.items():
        if len(numbered[kind]) != len(got):
            raise DownloadError(f"{folder}/ in {repo.name}: the {kind} shards are not numbered 0, 1, 2, ...; "
                                "the repository is incomplete")
    if not numbered["val"]:
        raise DownloadError(f"{folder}/ in {repo.name} holds no fineweb_val_*.bin; the repository is incomplete")
    if variant.sidecar and len(numbered["val_bytes"]) != len(numbered["val"]):
        raise DownloadError(f"{folder}/ in {repo.name} has {len(numbered['val_bytes'])} byte sidecars "
                            f"(fineweb_val_bytes_*.bin) for {len(numbered['val'])} val shards; it is incomplete")
    tok_path = f"{REMOTE_ROOT}/tokenizers/{variant.tokenizer}"
    tokenizer = repo.files(f"{REMOTE_ROOT}/tokenizers").get(tok_path)
    if tokenizer is None:
        raise DownloadError(f"{repo.name} has no {tok_path}; check --variant (or --repo-id / --mirror)")
    return tokenizer, numbered["val"], numbered["val_bytes"] if variant.sidecar else [], numbered["train"]


def write_manifest(data_dir, source, val_docs) -> None:
    """caseops_manifest.json for downloaded CaseOps data: the upstream export puts the first val_docs documents in
    validation and the rest in training (so the first training document is val_docs), and every train shard fetched
    here is checked for validation documents (check_overlap) before it is placed."""
    manifest = dict(complete=True, source=source, val_docs=val_docs, train_first_doc=val_docs,
                    split_check="data/download.py: no train shard holds a validation document")
    with open(os.path.join(data_dir, "caseops_manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


def download(variant: Variant, data_root, n_train, repo, log=print) -> dict:
    tokenizer, val, sidecars, train = listing(repo, variant)
    if n_train > len(train):
        raise DownloadError(f"--train-shards {n_train}: {repo.name} holds {len(train)} train shards of "
                            f"{variant.dataset}; ask for {len(train)} or fewer")
    data_dir = os.path.join(data_root, "datasets", variant.dataset)
    tok_dir = os.path.join(data_root, "tokenizers")
    d = Downloader(repo, log)

    def item(remote, folder) -> Item:
        return Item(remote, os.path.join(folder, os.path.basename(remote.path)))

    tok = item(tokenizer, tok_dir)
    path = d.ensure(tok, shard=False)
    try:
        check_tokenizer(path, variant.vocab)
    except DownloadError:
        if path == tok.part:
            os.remove(path)
        raise
    place(path, tok)

    # validation first: a non-canonical split is refused before any train shard is fetched
    val_items = [item(f, data_dir) for f in val + sidecars]
    ready = [d.ensure(it) for it in val_items]
    parts = [read_tokens(p) for p in ready]
    try:
        n_docs = check_val(variant, parts[:len(val)], parts[len(val):])
    except DownloadError:
        for p, it in zip(ready, val_items):
            if p == it.part:
                os.remove(p)
        raise
    for p, it in zip(ready, val_items):
        place(p, it)
    tokens = np.concatenate(parts[:len(val)])
    val_hashes = set(doc_hashes(tokens))

    if variant.sidecar:  # what train_gpt.py's CASEOPS_ENABLED=1 checks (the same file data/caseops.py writes)
        write_manifest(data_dir, repo.name, n_docs)
    train_tokens = 0
    for f in train[:n_train]:
        it = item(f, data_dir)
        path = d.ensure(it)
        shard = read_tokens(path)
        try:
            check_overlap(os.path.basename(it.dest), shard, val_hashes)
        except DownloadError:
            if path == it.part:
                os.remove(path)
            raise
        place(path, it)
        train_tokens += len(shard)
    return dict(data_path=data_dir, tokenizer_path=tok.dest, val_tokens=len(tokens), val_docs=n_docs,
                train_tokens=train_tokens, train_shards=n_train, fetched=d.fetched, kept=d.kept)


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", required=True, help=" | ".join(VARIANTS))
    p.add_argument("--train-shards", type=int, default=80, help="train shards to fetch (default 80; the first N)")
    p.add_argument("--data-root", default=os.path.join(ROOT, "data"),
                   help="where datasets/ and tokenizers/ go (default: this checkout's data/)")
    p.add_argument("--repo-id", help="another hub repository with the same layout (default: the variant's)")
    p.add_argument("--mirror", help="a local folder laid out like the hub repository, instead of the network")
    return p.parse_args(argv)


def main(argv=None, repo=None) -> int:
    args = parse_args(argv)
    try:
        variant = VARIANTS.get(args.variant)
        if variant is None:
            raise DownloadError(f"unknown variant {args.variant!r}; use --variant {', '.join(VARIANTS)}")
        if args.repo_id:
            variant = dataclasses.replace(variant, repo_id=args.repo_id)
        if args.train_shards < 0:
            raise DownloadError(f"--train-shards {args.train_shards}: must be 0 or more")
        staging = os.path.join(args.data_root, ".download")
        repo = repo or (LocalRepo(args.mirror) if args.mirror else HubRepo(variant.repo_id, staging))
        got = download(variant, args.data_root, args.train_shards, repo)
        shutil.rmtree(staging, ignore_errors=True)
    except DownloadError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume (finished files are kept)", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror or e}; check the disk and --data-root",
              file=sys.stderr)
        return 1
    extra = ", byte sidecar checked" if variant.sidecar else ""
    print(f"{variant.name}: val {got['val_tokens']:,} tokens ({got['val_docs']:,} documents{extra}), train "
          f"{got['train_tokens']:,} tokens in {got['train_shards']} shards ({got['fetched']} files downloaded, "
          f"{got['kept']} kept); export DATA_PATH={os.path.abspath(got['data_path'])} "
          f"TOKENIZER_PATH={os.path.abspath(got['tokenizer_path'])} VOCAB_SIZE={variant.vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
