"""CaseOps (data/caseops.py): the transform against upstream's outputs and as an exact round trip, the byte sidecar
(totals equal the original bytes, operators count 0), the tokenizer, the preparation's manifest and the split
guard."""
import glob
import hashlib
import io
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import caseops  # noqa: E402
from data.caseops import ALLCAPS, CAPNEXT, ESC, OPERATORS, TITLE, CaseOpsError, decode, encode  # noqa: E402
from data.make_sample import STDLIB, source_docstrings, train_tokenizer  # noqa: E402

GOLDEN = json.loads((ROOT / "tests" / "golden" / "caseops_transform.json").read_text())
PROXY_TEXT = ROOT.parent / "shared" / "proxy" / "text"

ADVERSARIAL = ["", "a", "Z", "I", "A.B.", "camelCase", "PascalCase", "snake_Case_X", "HTTPServerError", "aBcDeF",
               "ABCdef", "x" * 1000 + "Y", "Ü", "ÜBER über Über", "ǈ", "ß", "ﬀ", "ᵃ", "\u212a", "İ", "ı", "123ABC456",
               "a1B2c3D", "e.g. U.S. I.B.M.", "\n\n\t  \r\n", "  edge  ", "\u2581", "\u2581\u2581X",
               "".join(OPERATORS), ESC * 5, TITLE + "a", ALLCAPS + "ab", CAPNEXT, "a" + ESC, ESC + "A",
               "\ue000\ue005\uf8ff", "😀Ab😀", "\x00\x07\x7f", "🇺🇸 USA", "e\u0301 E\u0301"]


def random_strings(n, seed=0):
    """Strings mixing cases, digits, punctuation, whitespace, non-ASCII letters, emoji and the operators."""
    rng = random.Random(seed)
    alphabet = (list("aAbBcCxXyYzZiI0123456789 .,;'-_\n\t") + ["é", "É", "ß", "ǅ", "ﬁ", "😀", "\u2581", "\u00a0"]
                + list(OPERATORS) + ["\ue000"])
    for _ in range(n):
        if rng.random() < 0.2:  # any code point but surrogates (which no UTF-8 text holds)
            yield "".join(chr(rng.choice([rng.randrange(0xD800), rng.randrange(0xE000, 0x110000)]))
                          for _ in range(rng.randint(0, 20)))
        else:
            yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))


# ---- the transform ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDEN["transform"], ids=lambda c: repr(c["input"])[:30])
def test_encode_gives_upstream_outputs(case):
    assert encode(case["input"]) == case["output"]
    assert decode(case["output"]) == case["input"]


def test_round_trip_is_exact_on_adversarial_text():
    for text in ADVERSARIAL:
        transformed = encode(text)
        assert decode(transformed) == text
        assert not any("A" <= c <= "Z" for c in transformed)  # no ASCII capital survives
    assert encode("The NASA iPhone") == f"{TITLE}the {ALLCAPS}nasa i{CAPNEXT}phone"
    assert encode("I A") == f"{TITLE}i {TITLE}a"  # a single capital is TITLE, not ALLCAPS
    assert encode(TITLE + ESC) == ESC + TITLE + ESC + ESC


def test_round_trip_is_exact_on_random_strings():
    for text in random_strings(3000):
        assert decode(encode(text)) == text


@pytest.mark.parametrize("bad", [TITLE, ALLCAPS + "a", "A", "a" + TITLE + "b", CAPNEXT, ESC, "x" + ALLCAPS + "ab",
                                 TITLE + "1", ALLCAPS + "ab" + CAPNEXT + "c"])
def test_decode_rejects_what_encode_cannot_produce(bad):
    with pytest.raises(ValueError, match="not a CaseOps encoding"):
        decode(bad)


# ---- the byte sidecar ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDEN["sidecar"], ids=lambda c: f"{c['input'][:20]!r}/{c['piece_chars']}")
def test_piece_counts_match_upstream(case):
    """Pieces that tile the encoded text (no normalizer gaps) get upstream's counts."""
    transformed = encode(case["input"])
    starts = list(range(0, len(transformed), case["piece_chars"]))
    spans = [(a, min(a + case["piece_chars"], len(transformed))) for a in starts]
    counts = caseops.token_byte_counts(transformed, spans)
    assert counts.tolist() == case["counts"]


def test_char_bytes_count_operators_zero_and_escaped_literals_whole():
    assert caseops.char_original_bytes(TITLE + "ab" + CAPNEXT + "c").tolist() == [0, 1, 1, 0, 1]
    assert caseops.char_original_bytes(ESC + TITLE + ESC + ESC + "é😀").tolist() == [0, 3, 0, 3, 2, 4]
    for text in random_strings(500, seed=1):
        assert caseops.char_original_bytes(encode(text)).sum() == len(text.encode("utf-8"))


def test_counts_carry_edge_whitespace_and_whole_fallback_characters():
    # "  ab  ": the normalizer drops both edges, so the one piece spans [2, 4); the counts still sum to 6
    assert caseops.token_byte_counts("  ab  ", [(2, 4)]).tolist() == [6]
    # edges never land on an operator: " " TITLE "a " -> pieces TITLE, "a"
    assert caseops.token_byte_counts(f" {TITLE}a ", [(1, 2), (2, 3)]).tolist() == [0, 3]
    # "é" as two byte-fallback pieces: SentencePiece aligns the character with the last one
    assert caseops.token_byte_counts("éx", [(0, 0), (0, 1), (1, 2)]).tolist() == [0, 2, 1]
    with pytest.raises(ValueError):
        caseops.token_byte_counts("abc", [(0, 2), (1, 1), (1, 3)])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny CaseOps tokenizer (vocab 400) trained on ~300 KB: proxy training text, else stdlib docstrings."""
    if PROXY_TEXT.exists():
        texts = [t for t, _ in zip(caseops.read_texts(str(PROXY_TEXT / "docs_000.jsonl.zst")), range(100))]
    else:
        texts = ["\n\n".join(source_docstrings(p)) for p in sorted(glob.glob(os.path.join(STDLIB, "*.py")))[:60]]
    texts = [t[:3000] for t in texts] + ADVERSARIAL
    prefix = str(tmp_path_factory.mktemp("tok") / "caseops")
    caseops.train_caseops_tokenizer(texts, prefix, 400, num_threads=1)
    return prefix + ".model"


def test_tokenizer_reserves_the_operators(tokenizer):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    caseops.check_tokenizer(sp, tokenizer)
    assert [sp.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>", *OPERATORS]
    assert sp.encode(encode("The CAT")) [:1] == [4]  # TITLE is one piece, id 4 as upstream


def sidecar_docs():
    docs = []
    if PROXY_TEXT.exists():
        docs = [t for t, _ in zip(caseops.read_texts(str(PROXY_TEXT / "val_docs.jsonl.zst")), range(150))]
    return docs + ADVERSARIAL + list(random_strings(300, seed=2)) + ["  Leading and trailing\n\n", "ﬁne™ … x\x07y"]


def test_sidecar_totals_equal_the_documents_bytes(tokenizer):
    caseops._init_worker(tokenizer)
    docs = sidecar_docs()
    r = caseops._val_batch(docs)
    tokens, sidecar = r["tokens"], r["sidecar"]
    assert len(tokens) == len(sidecar) and r["docs"] == len(docs) == (tokens == 1).sum()
    assert not sidecar[tokens == 1].any()  # BOS counts 0
    raw = sum(len(d.encode("utf-8")) for d in docs)
    assert r["text_bytes"] == raw and sidecar.sum(dtype=np.int64) + r["unscored"] == raw
    # unscored: only documents the normalizer empties (whitespace and control characters only)
    assert r["unscored"] == sum(len(d.encode()) for d in docs if not caseops._sp.encode(encode(d)))
    assert r["unscored"] < 200
    for start, end in zip(*doc_bounds(tokens)):  # and document by document
        doc = docs[int((tokens[:start] == 1).sum())]
        if end > start + 1:
            assert sidecar[start:end].sum() == len(doc.encode("utf-8"))


def doc_bounds(tokens):
    starts = np.flatnonzero(tokens == 1)
    return starts, np.append(starts[1:], len(tokens))


def test_operator_pieces_count_zero_bytes(tokenizer):
    """An upstream PR counted the operators' 3 UTF-8 bytes each, inflating the bytes by 8.95% (#2138)."""
    caseops._init_worker(tokenizer)
    docs = sidecar_docs()
    r = caseops._val_batch(docs)
    tokens, sidecar = r["tokens"], r["sidecar"]
    escaped = np.zeros(len(tokens), bool)
    for i in np.flatnonzero(tokens == 7):  # ESC (id 7) makes the next piece literal
        if not escaped[i]:
            escaped[i + 1] = True
    operator = np.isin(tokens, [4, 5, 6, 7]) & ~escaped
    assert operator.sum() > 100 and not sidecar[operator].any()
    assert (sidecar[np.isin(tokens, [4, 5, 6, 7]) & escaped] >= 3).all()  # a literal: 3, plus edge whitespace
    transformed_bytes = sum(len(encode(d).encode("utf-8")) for d in docs)
    assert transformed_bytes > sidecar.sum(dtype=np.int64) + r["unscored"]  # what counting operators would give


# ---- preparation and the split guard ------------------------------------------------------------------------------

def write_jsonl(path, texts, zst=True):
    lines = "".join(json.dumps({"text": t, "source": "test"}) + "\n" for t in texts).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(lines) if zst else lines)


def corpus_docs(n, seed):
    rng = random.Random(seed)
    words = ["The", "NASA", "launch", "iPhone", "McDonald's", "über", "café", "2024", "I", "A.B.", "x" + ESC, "ok"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) + rng.choice(["", ".", "\n\nEnd"])
            for _ in range(n)]


@pytest.fixture
def proxy_src(tmp_path):
    (tmp_path / "src" / "text").mkdir(parents=True)
    docs = dict(val_docs=corpus_docs(12, 0), docs_000=corpus_docs(30, 1), docs_001=corpus_docs(25, 2))
    for name, texts in docs.items():
        write_jsonl(tmp_path / "src" / "text" / f"{name}.jsonl.zst", texts)
    return tmp_path / "src", docs


def run(*args):
    caseops.main([str(a) for a in args])


def read_manifest(out):
    return json.loads((out / caseops.MANIFEST).read_text())


def test_prepare_proxy_writes_shards_sidecar_and_a_manifest_of_the_split(tmp_path, proxy_src, tokenizer):
    src, docs = proxy_src
    out = tmp_path / "out"
    run("proxy", "--src", src, "--out", out, "--tokenizer", tokenizer, "--workers", 1, "--shard-tokens", 500)
    m = read_manifest(out)
    val_raw = sum(len(t.encode()) for t in docs["val_docs"])
    assert m["complete"] and m["val_docs"] == 12 and m["train_first_doc"] == 12 and m["train_docs"] == 55
    assert m["val_text_bytes"] == m["sidecar_bytes"] == val_raw and m["unscored_bytes"] == 0
    assert m["tokenizer"]["sha256"] == hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    assert m["operators"] == dict(TITLE="U+E001", ALLCAPS="U+E002", CAPNEXT="U+E003", ESC="U+E004")
    for kind in ("val", "val_bytes", "train"):
        for f in m["files"][kind]:
            assert hashlib.sha256((out / f["name"]).read_bytes()).hexdigest() == f["sha256"]

    # the glob fineweb_val_*.bin also matches the sidecar (upstream's name): val_token_files leaves it out
    assert any("bytes" in p for p in glob.glob(str(out / "fineweb_val_*.bin")))
    val_files = caseops.val_token_files(str(out))
    assert [os.path.basename(p) for p in val_files] == [f["name"] for f in m["files"]["val"]]
    tokens = np.concatenate([caseops.read_values(p) for p in val_files])
    sidecar = np.concatenate([caseops.read_values(p) for p in caseops.sidecar_files(str(out))])
    assert len(tokens) == len(sidecar) == m["val_tokens"] and len(m["files"]["val"]) > 1  # shards of 500
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    expected = [x for t in docs["val_docs"] for x in [1, *sp.encode(encode(t))]]
    assert tokens.tolist() == expected
    train = np.concatenate([caseops.read_values(p) for p in sorted(glob.glob(str(out / "fineweb_train_*.bin")))])
    assert train.tolist() == [x for t in docs["docs_000"] + docs["docs_001"] for x in [1, *sp.encode(encode(t))]]
    assert caseops.verify_data_dir(str(out), tokenizer_path=str(out / Path(tokenizer).name))["val_docs"] == 12
    with pytest.raises(CaseOpsError, match="is not the tokenizer the data was made with"):
        caseops.verify_data_dir(str(out), tokenizer_path=str(src / "text" / "val_docs.jsonl.zst"))

    # a rerun with the same settings is fine; other settings are refused in one line
    run("proxy", "--src", src, "--out", out, "--tokenizer", tokenizer, "--workers", 1, "--shard-tokens", 500)
    with pytest.raises(SystemExit, match=r"^caseops: .* other settings \(shard_tokens\); choose another --out"):
        run("proxy", "--src", src, "--out", out, "--tokenizer", tokenizer, "--workers", 1)


def test_prepare_fineweb_takes_the_head_as_validation(tmp_path, tokenizer):
    docs = corpus_docs(50, 3)
    write_jsonl(tmp_path / "docs_selected.jsonl", docs, zst=False)
    out = tmp_path / "fw"
    run("fineweb", "--docs", tmp_path / "docs_selected.jsonl", "--out", out, "--val-docs", 20,
        "--tokenizer", tokenizer, "--workers", 2)  # 2: through the worker pool
    m = read_manifest(out)
    assert (m["val_docs"], m["train_first_doc"], m["train_docs"]) == (20, 20, 30)
    assert m["sidecar_bytes"] == sum(len(t.encode()) for t in docs[:20])
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    train = caseops.read_values(str(out / "fineweb_train_000000.bin"))
    first = [1, *sp.encode(encode(docs[20]))]
    assert train[:len(first)].tolist() == first  # training starts right after the validation documents
    caseops.verify_data_dir(str(out), expected_val_docs=20)
    with pytest.raises(CaseOpsError, match="evaluation expects 50000; rerun data/caseops.py with --val-docs 50000"):
        caseops.verify_data_dir(str(out), expected_val_docs=50_000)

    with pytest.raises(SystemExit, match=r"^caseops: the source holds only 50 validation documents, fewer than "
                                         r"--val-docs 60; lower --val-docs"):
        run("fineweb", "--docs", tmp_path / "docs_selected.jsonl", "--out", tmp_path / "fw2", "--val-docs", 60,
            "--tokenizer", tokenizer, "--workers", 1)


def test_too_many_val_docs_is_named_before_training_a_tokenizer(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", corpus_docs(5, 4), zst=False)
    with pytest.raises(SystemExit, match=r"^caseops: no training documents to train the tokenizer on .*--val-docs 9"):
        run("fineweb", "--docs", tmp_path / "docs.jsonl", "--out", tmp_path / "o", "--val-docs", 9, "--vocab", 300,
            "--workers", 1)


def test_tokenizer_without_operator_pieces_is_refused(tmp_path, proxy_src):
    src, docs = proxy_src
    plain = train_tokenizer(docs["docs_000"] * 4, str(tmp_path / "plain"), 300, num_threads=1)
    assert plain.vocab_size() == 300
    with pytest.raises(SystemExit, match=r"^caseops: .*plain.model: operator U\+E001 is not a piece of its own"):
        run("proxy", "--src", src, "--out", tmp_path / "o", "--tokenizer", tmp_path / "plain.model", "--workers", 1)


def test_a_folder_of_foreign_shards_is_refused(tmp_path, proxy_src, tokenizer):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "fineweb_train_000000.bin").write_bytes(b"")
    with pytest.raises(SystemExit, match="holds shards that no caseops_manifest.json describes"):
        run("proxy", "--src", proxy_src[0], "--out", tmp_path / "o", "--tokenizer", tokenizer, "--workers", 1)


def test_check_split_refuses_overlap():
    ok = dict(complete=True, val_docs=50_000, train_first_doc=50_000)
    caseops.check_split(ok, 50_000, expected_val_docs=50_000)
    # the upstream leak: prepared with 10,000 validation documents, scored on 50,000
    leak = dict(ok, val_docs=10_000, train_first_doc=10_000)
    with pytest.raises(CaseOpsError, match="train shards start at document 10000, inside the 50000 validation"):
        caseops.check_split(leak, 50_000)
    with pytest.raises(CaseOpsError, match="overlap"):
        caseops.check_split(dict(ok, train_first_doc=49_999), 50_000)
    with pytest.raises(CaseOpsError, match="evaluation expects 50000"):
        caseops.check_split(leak, 10_000, expected_val_docs=50_000)
    with pytest.raises(CaseOpsError, match="shards hold 40000 documents but the manifest says 50000"):
        caseops.check_split(ok, 40_000)
    with pytest.raises(CaseOpsError, match="did not finish"):
        caseops.check_split(dict(ok, complete=False), 50_000)


def test_verify_data_dir_catches_tampering(tmp_path, proxy_src, tokenizer):
    out = tmp_path / "out"
    run("proxy", "--src", proxy_src[0], "--out", out, "--tokenizer", tokenizer, "--workers", 1)
    caseops.verify_data_dir(str(out))
    extra = out / "fineweb_train_000001.bin"  # a train shard the manifest does not list (another preparation's)
    extra.write_bytes((out / "fineweb_train_000000.bin").read_bytes())
    with pytest.raises(CaseOpsError, match="train shards on disk are not the manifest's"):
        caseops.verify_data_dir(str(out))
    extra.unlink()
    sidecar = out / "fineweb_val_bytes_000000.bin"
    raw = bytearray(sidecar.read_bytes())
    raw[-2] ^= 1
    sidecar.write_bytes(bytes(raw))
    with pytest.raises(CaseOpsError, match="differs from the manifest"):
        caseops.verify_data_dir(str(out))


def test_a_malformed_source_line_is_named(tmp_path, tokenizer):
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n["no", "text"]\n')
    with pytest.raises(SystemExit, match=r'^caseops: .*docs.jsonl line 2: not a JSON object with a "text" field'):
        run("fineweb", "--docs", tmp_path / "docs.jsonl", "--out", tmp_path / "o", "--val-docs", 1,
            "--tokenizer", tokenizer, "--workers", 1)


# ---- train_gpt.py on CaseOps data: bytes from the sidecar, and every way the data can be wrong is one line

@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory, tokenizer):
    base = tmp_path_factory.mktemp("caseops_run")
    (base / "src" / "text").mkdir(parents=True)
    for name, (n, seed) in dict(val_docs=(20, 0), docs_000=(200, 1)).items():
        write_jsonl(base / "src" / "text" / f"{name}.jsonl.zst", corpus_docs(n, seed))
    out = base / "data"
    run("proxy", "--src", base / "src", "--out", out, "--tokenizer", tokenizer, "--workers", 1, "--shard-tokens", 400)
    return out, str(out / Path(tokenizer).name), read_manifest(out)


def caseops_args(out, tok, **kw):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_args
    return tiny_args(DATA_PATH=str(out), TOKENIZER_PATH=tok, VOCAB_SIZE=400, CASEOPS_ENABLED=1, **kw)


def test_train_gpt_scores_caseops_bytes_from_the_sidecar(caseops_data, tmp_path):
    """The scored bytes of a whole run (plain eval and TTT) are the original documents' UTF-8 bytes, exactly; the
    tokenizer's byte tables would count each operator's 3 bytes; the sidecar is never read as validation tokens."""
    import train_gpt
    from conftest import cpu_runtime
    out, tok, m = caseops_data
    args = caseops_args(out, tok, ITERATIONS=2, LOG_DIR=str(tmp_path), RUN_ID="c", TTT_ENABLED=1,
                        TTT_CHUNK_TOKENS=256, SUBMISSION_JSON=str(tmp_path / "s.json"))
    s = train_gpt.run(args, cpu_runtime())
    assert s["final"]["bytes"] == s["ttt"]["bytes"] == s["roundtrip"]["bytes"] == m["sidecar_bytes"]
    assert s["final"]["tokens"] == m["val_tokens"] - 1
    val, _ = train_gpt.load_val_tokens(args)
    import sentencepiece as spm
    tables = train_gpt.build_byte_luts(spm.SentencePieceProcessor(model_file=tok), 400)
    assert int(train_gpt.target_bytes(val[:-1], val[1:], tables).sum()) > m["sidecar_bytes"]  # operators counted
    # a re-score reads CASEOPS_ENABLED from the artifact
    again = train_gpt.Hyperparameters.from_env(dict(DATA_PATH=str(out), TOKENIZER_PATH=tok, LOG_DIR=str(tmp_path),
                                                    RUN_ID="again", EVAL_ARTIFACT=s["artifact_path"]))
    assert again.caseops_enabled and train_gpt.run(again, cpu_runtime())["final"]["bytes"] == m["sidecar_bytes"]


def test_a_cut_validation_set_takes_the_sidecar_cut_with_it(caseops_data):
    import train_gpt
    out, tok, m = caseops_data
    args = caseops_args(out, tok, VAL_MAX_TOKENS=100)
    val, cut = train_gpt.load_val_tokens(args)
    side = train_gpt.load_byte_sidecar(args, val)
    full = np.concatenate([caseops.read_values(p) for p in caseops.sidecar_files(str(out))])
    assert cut and side.tolist() == full[:101].tolist()


@pytest.mark.parametrize("damage,message", [
    ("no sidecar", "has no fineweb_val_bytes_\\*.bin byte sidecar"),
    ("short sidecar", "the byte sidecar in .* has \\d+ entries for \\d+ validation tokens"),
    ("no manifest", "caseops_manifest.json is missing"),
    ("overlap", "the train shards may hold validation documents"),
    ("fewer val docs", "the train shards may hold validation documents"),
    ("plain tokenizer", "has no CaseOps operator pieces"),
    ("flag off", "has CaseOps operator pieces: set CASEOPS_ENABLED=1")])
def test_caseops_data_that_cannot_be_scored_is_one_line(caseops_data, tmp_path, damage, message):
    import shutil
    import train_gpt
    src, tok, m = caseops_data
    out = tmp_path / "d"
    shutil.copytree(src, out)
    tok = str(out / Path(tok).name)
    flags = dict(CASEOPS_ENABLED=1)
    sidecars = caseops.sidecar_files(str(out))
    if damage == "no sidecar":
        for p in sidecars:
            os.remove(p)
    elif damage == "short sidecar":
        os.remove(sidecars[-1])
    elif damage == "no manifest":
        os.remove(out / caseops.MANIFEST)
    elif damage in ("overlap", "fewer val docs"):  # the leak: a prep that cut validation shorter than evaluation
        key = "train_first_doc" if damage == "overlap" else "val_docs"
        (out / caseops.MANIFEST).write_text(json.dumps(dict(m, **{key: m["val_docs"] - 5})))
    elif damage == "plain tokenizer":
        tok = str(ROOT.parent / "shared" / "proxy" / "tokenizers" / "fineweb_1024_bpe.model")
        if not os.path.exists(tok):
            pytest.skip("challenge tokenizer not found")
        flags["VOCAB_SIZE"] = 1024
    else:
        flags["CASEOPS_ENABLED"] = 0
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import cpu_runtime, tiny_env
    env = tiny_env(DATA_PATH=str(out), TOKENIZER_PATH=tok, LOG_DIR=str(tmp_path / "logs"), RUN_ID="x",
                   **dict(dict(VOCAB_SIZE=400), **flags))
    with pytest.raises(train_gpt.UserError, match=message) as e:
        train_gpt.run(train_gpt.Hyperparameters.from_env(env), cpu_runtime())
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "logs" / "x.txt")
