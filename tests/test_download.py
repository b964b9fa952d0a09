"""data/download.py against a local folder laid out like the hub repository: placement, resume after an interrupted
download, corrupted shards (in place and in the repository), the canonical validation split, train shards holding
validation documents, the CaseOps byte sidecar, and one-line errors for each bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
import train_gpt
from data import download
from data.download import BOS_ID, LocalRepo, RemoteFile, Variant
from data.make_sample import train_tokenizer
from data.shards import write_shard

VOCAB, SEQ = 300, 16
VAL_DOCS = 20
DATASET = "fineweb10B_test"
TOKENIZER = "test_bpe.model"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A real SentencePiece model of VOCAB pieces (the script loads it to check its size)."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(400)]
    texts = [" ".join(rng.choice(words, size=60)) for _ in range(200)]
    prefix = str(tmp_path_factory.mktemp("tok") / "tok")
    train_tokenizer(texts, prefix, VOCAB)
    return prefix + ".model"


def make_docs(n, seed):
    rng = np.random.default_rng(seed)
    return [np.array([BOS_ID, *rng.integers(4, VOCAB, size=rng.integers(5, 40))], dtype=np.uint16) for _ in range(n)]


def byte_counts(tokens):
    counts = np.where(tokens == BOS_ID, 0, (tokens % 5) + 1)  # any per-token counts, 0 at BOS
    return counts.astype(np.uint16)


def build_hub(root, tokenizer_file, val_docs=VAL_DOCS, train_shards=3, docs_per_shard=30, sidecar=True,
              val_in_train=0):
    """A hub-like folder: the first val_docs documents are validation, the rest train (val_in_train of the
    validation documents are also put at the start of train shard 0, like an export that cut validation short)."""
    data = root / "datasets" / "datasets" / DATASET
    data.mkdir(parents=True)
    (root / "datasets" / "tokenizers").mkdir(parents=True)
    shutil.copy(tokenizer_file, root / "datasets" / "tokenizers" / TOKENIZER)
    docs = make_docs(val_docs + train_shards * docs_per_shard, seed=1)
    val = np.concatenate(docs[:val_docs])
    write_shard(data / "fineweb_val_000000.bin", val)
    if sidecar:
        write_shard(data / "fineweb_val_bytes_000000.bin", byte_counts(val))
    train = docs[val_docs - val_in_train:]
    for i in range(train_shards):
        shard = train[i * docs_per_shard:(i + 1) * docs_per_shard]
        write_shard(data / f"fineweb_train_{i:06d}.bin", np.concatenate(shard))
    return root, len(val)


def variant_for(n_val_tokens, **kw):
    targets = (n_val_tokens - 1) // SEQ * SEQ
    return Variant("caseops", "local/test", DATASET, TOKENIZER, VOCAB, sidecar=kw.pop("sidecar", True),
                   val_docs=VAL_DOCS, val_targets=(targets, SEQ), **kw)


@pytest.fixture
def hub(tmp_path, tokenizer_file, monkeypatch):
    root, n_val = build_hub(tmp_path / "hub", tokenizer_file)
    monkeypatch.setitem(download.VARIANTS, "caseops", variant_for(n_val))
    return root


def run(tmp_path, *extra, repo=None, variant="caseops", shards=3):
    argv = ["--variant", variant, "--train-shards", str(shards), "--data-root", str(tmp_path / "data"),
            "--mirror", str(tmp_path / "hub"), *extra]
    return download.main(argv, repo=repo)


def data_dir(tmp_path):
    return tmp_path / "data" / "datasets" / DATASET


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def same_files(tmp_path, names):
    hub_dir = tmp_path / "hub" / "datasets" / "datasets" / DATASET
    for name in names:
        assert (data_dir(tmp_path) / name).read_bytes() == (hub_dir / name).read_bytes(), name


ALL = ["fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(3)]


def test_download_places_every_file_and_prints_what_to_export(tmp_path, hub, capsys):
    assert run(tmp_path) == 0
    out, err = capsys.readouterr()
    same_files(tmp_path, ALL)
    assert (tmp_path / "data" / "tokenizers" / TOKENIZER).is_file()
    assert not list((tmp_path / "data").rglob("*.part"))
    last = out.strip().splitlines()[-1]
    train_tokens = sum(train_gpt.shard_tokens(str(data_dir(tmp_path) / f"fineweb_train_{i:06d}.bin")) for i in range(3))
    assert f"train {train_tokens:,} tokens in 3 shards" in last and f"({VAL_DOCS:,} documents" in last
    assert f"DATA_PATH={data_dir(tmp_path)}" in last and f"VOCAB_SIZE={VOCAB}" in last
    assert "6 files downloaded, 0 kept" in last  # 5 shards + the tokenizer
    assert err == ""  # not a terminal: no progress bars
    # the split manifest train_gpt.py's CASEOPS_ENABLED=1 checks, written once the validation split is checked
    manifest = json.loads((data_dir(tmp_path) / "caseops_manifest.json").read_text())
    assert manifest["complete"] and manifest["val_docs"] == manifest["train_first_doc"] == VAL_DOCS
    args = train_gpt.Hyperparameters.from_env(dict(DATA_PATH=str(data_dir(tmp_path)), CASEOPS_ENABLED="1"))
    train_gpt.check_caseops_split(args, VAL_DOCS)
    with pytest.raises(train_gpt.UserError, match="the train shards may hold validation documents"):
        train_gpt.check_caseops_split(args, VAL_DOCS + 1)


def test_a_second_run_keeps_good_files_and_refetches_a_truncated_or_corrupted_one(tmp_path, hub, capsys):
    assert run(tmp_path) == 0
    capsys.readouterr()
    truncated, corrupted = data_dir(tmp_path) / ALL[2], data_dir(tmp_path) / ALL[3]
    truncated.write_bytes(truncated.read_bytes()[:1500])  # half-downloaded by some other tool
    raw = bytearray(corrupted.read_bytes())
    raw[0] ^= 0xFF  # right size, broken header
    corrupted.write_bytes(bytes(raw))
    assert run(tmp_path) == 0
    out = capsys.readouterr().out
    assert "2 files downloaded, 4 kept" in out
    assert f"{ALL[2]}: downloading again (size 1,500" in out and f"{ALL[3]}: downloading again" in out
    same_files(tmp_path, ALL)


class InterruptedRepo(LocalRepo):
    """Stops (like Ctrl-C) after the first chunk of one file; counts the bytes it reads."""

    def __init__(self, root, stop_at=None):
        super().__init__(root)
        self.stop_at, self.read_bytes = stop_at, 0

    def fetch(self, remote, part):
        self.current = os.path.basename(remote.path)
        self.chunks = 0
        super().fetch(remote, part)

    def read(self, src):
        if self.current == self.stop_at and self.chunks == 1:
            raise KeyboardInterrupt
        self.chunks += 1
        chunk = super().read(src)
        self.read_bytes += len(chunk)
        return chunk


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, hub, capsys, monkeypatch):
    monkeypatch.setattr(download, "CHUNK", 256)
    victim = ALL[3]
    assert run(tmp_path, repo=InterruptedRepo(str(tmp_path / "hub"), stop_at=victim)) == 130
    one_line_error(capsys, "interrupted", "rerun the same command")
    part = data_dir(tmp_path) / (victim + ".part")
    assert part.stat().st_size == 256 and not (data_dir(tmp_path) / victim).exists()

    again = InterruptedRepo(str(tmp_path / "hub"))
    assert run(tmp_path, repo=again) == 0
    size = (tmp_path / "hub" / "datasets" / "datasets" / DATASET / victim).stat().st_size
    later = sum((tmp_path / "hub" / "datasets" / "datasets" / DATASET / n).stat().st_size for n in ALL[4:])
    assert again.read_bytes == size - 256 + later  # the kept files are not read, the victim only from byte 256
    same_files(tmp_path, ALL)


def test_a_corrupted_shard_in_the_repository_is_refused_and_not_placed(tmp_path, hub, capsys):
    bad = hub / "datasets" / "datasets" / DATASET / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-10])  # the header now promises more tokens than the file holds
    assert run(tmp_path) == 1
    one_line_error(capsys, "fineweb_train_000001.bin", "truncated or corrupt", "rerun")
    assert (data_dir(tmp_path) / "fineweb_train_000000.bin").is_file()
    assert not list(data_dir(tmp_path).glob("fineweb_train_000001.bin*"))


def test_a_file_whose_sha256_differs_from_the_hubs_is_refused(tmp_path, hub, capsys):
    class WrongSha(LocalRepo):
        def files(self, folder):
            return {p: RemoteFile(f.path, f.size, "0" * 64) for p, f in super().files(folder).items()}

    assert run(tmp_path, repo=WrongSha(str(tmp_path / "hub"))) == 1
    one_line_error(capsys, "SHA-256")


def test_more_train_shards_than_the_repository_holds(tmp_path, hub, capsys):
    assert run(tmp_path, shards=5) == 1
    one_line_error(capsys, "--train-shards 5", "holds 3 train shards", "3 or fewer")
    assert not (tmp_path / "data" / "datasets").exists()  # checked before anything is fetched


def test_unknown_variant_is_one_line_from_the_real_command(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "data" / "download.py"), "--variant", "sp4096",
                          "--mirror", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "unknown variant 'sp4096'" in res.stderr and "sp1024, sp8192, caseops" in res.stderr


def test_a_short_validation_split_is_refused_before_any_train_shard(tmp_path, tokenizer_file, capsys, monkeypatch):
    # an export that kept 10 validation documents: its "train" starts with the other 10
    _, n_val = build_hub(tmp_path / "hub", tokenizer_file, val_docs=10)
    monkeypatch.setitem(download.VARIANTS, "caseops", variant_for(n_val))
    assert run(tmp_path) == 1
    one_line_error(capsys, "10 documents", f"canonical {VAL_DOCS} documents", "validation")
    assert not list(data_dir(tmp_path).glob("fineweb_*"))  # nothing placed, no .part left


def test_a_train_shard_holding_validation_documents_is_refused(tmp_path, tokenizer_file, capsys, monkeypatch):
    _, n_val = build_hub(tmp_path / "hub", tokenizer_file, val_in_train=OVERLAP)
    monkeypatch.setitem(download.VARIANTS, "caseops", variant_for(n_val))
    assert run(tmp_path) == 1
    one_line_error(capsys, "fineweb_train_000000.bin", f"{OVERLAP} validation documents", "refused")
    assert not list(data_dir(tmp_path).glob("fineweb_train_*"))
    assert (data_dir(tmp_path) / "fineweb_val_000000.bin").is_file()


OVERLAP = download.OVERLAP_RUN


def test_an_isolated_duplicate_of_a_validation_document_is_allowed(tmp_path, tokenizer_file, monkeypatch):
    """The same page in both splits happens in real crawls; only runs of them (or many) mean a bad split."""
    _, n_val = build_hub(tmp_path / "hub", tokenizer_file, docs_per_shard=200)
    monkeypatch.setitem(download.VARIANTS, "caseops", variant_for(n_val))
    shard = tmp_path / "hub" / "datasets" / "datasets" / DATASET / "fineweb_train_000000.bin"
    val = download.read_tokens(str(tmp_path / "hub" / "datasets" / "datasets" / DATASET / "fineweb_val_000000.bin"))
    first_val_doc = val[:download.documents(val)[0][1]]
    write_shard(shard, np.concatenate([download.read_tokens(str(shard)), first_val_doc]))
    assert run(tmp_path) == 0


@pytest.mark.parametrize("defect, words", [
    ("missing", ["0 byte sidecars", "1 val shards"]),
    ("short", ["entries for", "another export"]),
    ("bos", ["BOS", "must give 0"]),
])
def test_a_bad_caseops_sidecar_is_refused(tmp_path, hub, capsys, defect, words):
    side = hub / "datasets" / "datasets" / DATASET / "fineweb_val_bytes_000000.bin"
    counts = download.read_tokens(str(side))
    if defect == "missing":
        side.unlink()
    elif defect == "short":
        write_shard(side, counts[:-1])
    else:
        counts[0] = 3  # position 0 is a BOS
        write_shard(side, counts)
    assert run(tmp_path) == 1
    one_line_error(capsys, *words)


def test_a_tokenizer_of_the_wrong_size_is_refused(tmp_path, hub, capsys, monkeypatch):
    monkeypatch.setitem(download.VARIANTS, "caseops",
                        Variant("caseops", "local/test", DATASET, TOKENIZER, 8192, sidecar=True, val_docs=VAL_DOCS))
    assert run(tmp_path) == 1
    one_line_error(capsys, f"{VOCAB} pieces, expected 8192")
    assert not (tmp_path / "data" / "tokenizers" / TOKENIZER).exists()


def test_the_variants_land_where_train_gpt_looks_by_default():
    """The default DATA_PATH / TOKENIZER_PATH (baseline fields; the default stack's and record0409's presets) are the
    download's."""
    base, stack = train_gpt.Hyperparameters(), train_gpt.Hyperparameters.from_env({})
    sp8192 = train_gpt.Hyperparameters.from_env({"PRESET": "record0409"})
    for variant, args in (("sp1024", base), ("sp8192", sp8192), ("caseops", stack)):
        v = download.VARIANTS[variant]
        assert args.data_path == f"./data/datasets/{v.dataset}"
        assert args.tokenizer_path == f"./data/tokenizers/{v.tokenizer}"
        assert args.vocab_size == v.vocab
    caseops = download.VARIANTS["caseops"]
    assert caseops.sidecar and caseops.val_docs == 50_000 and caseops.val_targets == (47_851_520, 2048)


def test_the_hub_path_lists_sizes_and_hashes_and_moves_each_download_into_place(tmp_path, hub, monkeypatch, capsys):
    """HubRepo's glue to huggingface_hub, with the two library calls it makes served from the local folder."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.hf_api import RepoFile
    mirror, calls = LocalRepo(str(hub)), []

    def list_repo_tree(self, repo_id, path_in_repo, repo_type):
        assert (repo_id, repo_type) == ("local/test", "dataset")
        return [RepoFile(path=f.path, size=f.size, oid="git-oid",
                         lfs=dict(size=f.size, oid=download.sha256_of(str(hub / f.path)), pointerSize=134))
                for f in mirror.files(path_in_repo).values()]

    def hf_hub_download(repo_id, filename, repo_type, local_dir, tqdm_class):
        calls.append(filename)
        got = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(got), exist_ok=True)
        shutil.copy(hub / filename, got)
        return got

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", list_repo_tree)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    argv = ["--variant", "caseops", "--train-shards", "2", "--data-root", str(tmp_path / "data")]
    assert download.main(argv) == 0
    assert calls[0] == f"datasets/tokenizers/{TOKENIZER}" and len(calls) == 5
    same_files(tmp_path, ALL[:4])
    assert not (tmp_path / "data" / ".download").exists()  # the library's staging folder is removed at the end
    capsys.readouterr()

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", unreachable)
    assert download.main(argv) == 1
    one_line_error(capsys, "local/test on the Hugging Face hub failed (ConnectionError", "--mirror DIR")


def test_offline_mode_of_the_real_library_is_one_line(tmp_path):
    pytest.importorskip("huggingface_hub")
    res = subprocess.run([sys.executable, str(ROOT / "data" / "download.py"), "--variant", "sp1024",
                          "--data-root", str(tmp_path)], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("download.py: error: listing willdepueoai/parameter-golf")


def test_the_readme_table_names_each_variants_repository_and_folders():
    readme = (ROOT / "README.md").read_text()
    for name, v in download.VARIANTS.items():
        row = f"| `{name}` | `{v.repo_id}`"
        assert row in readme, row
        line = next(l for l in readme.splitlines() if l.startswith(row))
        assert f"`{v.dataset}`" in line and f"`{v.tokenizer}`" in line
