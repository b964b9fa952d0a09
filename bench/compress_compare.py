"""Issue 17, "Bytes": one quantized model state, four containers, the bytes of each (CPU).

The same codes, scales and kept tensors are written by
  constriction  our `train_gpt.pack` with COMPRESSOR=constriction (each tensor's codes range-coded, the rest lzma);
  zstd          our `train_gpt.pack` with COMPRESSOR=zstd, level 22 (one stream);
  pergroup      a re-implementation, written here, of PR #2135's COMPRESSOR=pergroup: every quantized matrix's rows
                put in a greedy nearest-neighbour order (L1), the matrix transposed, all of them concatenated in name
                order and compressed by `lrzip -z -L 9` (ZPAQ); the row orders stored raw (uint16) in the frame; the
                rest (scales, LQER factors, kept tensors, metadata) torch.save'd, byte-shuffled (stride 2) and
                brotli-11'd. Without lrzip on PATH the matrices go to brotli-11 and the method is labelled so;
  brotli        torch.save of everything, byte shuffle, brotli-11 (the 2026-04-09 record's container).
Every container is decoded again and compared with the state it was given, array by array.

  python bench/compress_compare.py run --methods constriction,brotli --json bench/results/compress_compare/synth.json
  python bench/compress_compare.py run --artifact logs/<run>.ptz --json bench/results/compress_compare/sample.json
  python bench/compress_compare.py report bench/results/compress_compare/*.json --md bench/compress_results.md

`run` without --artifact/--checkpoint builds PRESET=frontier2135's model (vocab 8192, 11 x 512, MLP 4x) with
Student-t(6) x 0.02 weights (as bench/quant_bench.py frontier) and quantizes it with the preset's export (SDClip k
12.85 / attn 13 / MLP 11.5, int7 embedding at k 14, LQER rank 4 on the top 3) by round to nearest (GPTQ needs
Hessians; off here). --artifact takes a train_gpt.py artifact's own quantized state; --checkpoint a float state dict
of the preset's model. Each `run` merges its methods into the JSON (refusing a different quantized state), so the
slow methods can run as separate calls. `report` writes the Markdown from the JSON files.
"""
import argparse
import dataclasses
import datetime
import hashlib
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt  # noqa: E402
from bench.quant_bench import student_t_  # noqa: E402

METHODS = ("constriction", "zstd", "pergroup", "brotli")
ARRAY_KEYS = ("q", "scale", *train_gpt.LQER_KEYS, "awq_scale", "raw")
FIELD_KEYS = ("bits", "group", "lqer_group", "awq")
BROTLI_QUALITY = 11
LRZIP_COMPRESS = ("lrzip", "-z", "-L", "9")  # #2135's flags: ZPAQ back end, level 9


# ---------------------------------------------------------------------------------------------------------------------
# The quantized state

def preset_args(env=None) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters.from_env({"PRESET": "frontier2135", **(env or {})})


def synthetic_state(args, seed=0) -> dict:
    """The preset's model with Student-t(6) x 0.02 in every matrix but the skip and resid_mix tensors."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = train_gpt.GPT(args)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2 and "skip" not in n and "resid_mix" not in n:
                student_t_(p, g)
    return train_gpt.export_state(model)


def quantized_state(source, args, env=None, seed=0):
    """(quantized state, args, layer order at the end of training, description) of a source: 'synthetic', a float
    checkpoint ('checkpoint:PATH') or a train_gpt.py artifact ('artifact:PATH')."""
    kind, _, path = source.partition(":")
    if kind == "artifact":
        qstate, header = train_gpt.read_artifact(path)
        args = train_gpt.Hyperparameters.from_env({"EVAL_ARTIFACT": path, **(env or {})})
        sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
        return qstate, args, header["looping"], (f"the quantized state stored in `{os.path.basename(path)}` "
                                                 f"({os.path.getsize(path):,} bytes as written, sha256 {sha[:16]}...)")
    if kind == "checkpoint":
        model = train_gpt.GPT(args)
        model.load_state_dict(torch.load(path, map_location="cpu"), strict=True)
        state, what = train_gpt.export_state(model), f"the float checkpoint `{path}`"
    else:
        state, what = synthetic_state(args, seed), f"Student-t(6) x 0.02 weights (seed {seed}), not trained"
    t0 = time.perf_counter()
    q = train_gpt.quantize_state(state, args)  # no Hessians: round to nearest at the SDClip steps
    what += (f", quantized by round to nearest (no GPTQ) in {time.perf_counter() - t0:.1f}s: SDClip k "
             f"{args.matrix_clip_sigmas:g} (attention {args.attn_clip_sigmas:g}, MLP {args.mlp_clip_sigmas:g}) int"
             f"{args.matrix_bits}, embedding int{args.embed_bits} at k {args.embed_clip_sigmas:g}"
             + (f", LQER rank {args.lqer_rank} on the top {args.lqer_top_k} (B groups of {args.lqer_asym_group})"
                if args.lqer_enabled else ""))
    return q, args, args.num_loops > 0, what


def code_stats(qstate) -> dict:
    """Counts and the empirical (order-0, per tensor) entropy of the matrices' codes, and of the int6 ones alone."""
    out = dict(tensors=0, codes=0, entropy_bytes=0.0, int6_codes=0, int6_entropy_bits=0.0)
    for e in qstate.values():
        if "q" not in e or not e["q"].numel():
            continue
        c = np.bincount(e["q"].flatten().numpy().astype(np.int64) + 128)
        p = c[c > 0] / e["q"].numel()
        bits = float(-(p * np.log2(p)).sum()) * e["q"].numel()
        out["tensors"] += 1
        out["codes"] += e["q"].numel()
        out["entropy_bytes"] += bits / 8
        if e["bits"] == 6:
            out["int6_codes"] += e["q"].numel()
            out["int6_entropy_bits"] += bits
    out["int6_bits_per_code"] = out["int6_entropy_bits"] / max(out["int6_codes"], 1)
    return out


def fingerprint(qstate) -> str:
    h = hashlib.sha256()
    for name in sorted(qstate):
        for k in ARRAY_KEYS:
            if k in qstate[name]:
                h.update(f"{name}.{k}".encode())
                h.update(qstate[name][k].contiguous().numpy().tobytes())
    return h.hexdigest()


def differences(a, b) -> list[str]:
    """Where two quantized states differ (names, fields, array dtypes, shapes or values); empty when equal."""
    if set(a) != set(b):
        return [f"names differ: {sorted(set(a) ^ set(b))[:5]}"]
    out = []
    for name in a:
        ea, eb = a[name], b[name]
        for k in set(ARRAY_KEYS) & (set(ea) | set(eb)):
            x, y = ea.get(k), eb.get(k)
            if x is None or y is None or x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                out.append(f"{name}.{k}")
        for k in FIELD_KEYS:
            if json.dumps(ea.get(k)) != json.dumps(eb.get(k)):
                out.append(f"{name}:{k}")
    return out


def header_meta(qstate, args, looping) -> dict:
    """What our artifact's JSON header holds besides the arrays (so every container can rebuild the same model)."""
    return dict(config={k: getattr(args, k) for k in train_gpt.MODEL_FIELDS + train_gpt.EVAL_FIELDS},
                label=train_gpt.artifact_label(args), looping=looping,
                tokenizer_sha256=train_gpt.file_sha256(args.tokenizer_path),
                fields={n: {k: e[k] for k in FIELD_KEYS if k in e} for n, e in qstate.items()})


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks of the other containers

def byte_shuffle(data: bytes) -> bytes:
    """Even-indexed bytes first, then odd ones (stride 2: the two bytes of each fp16 go to separate halves)."""
    a = np.frombuffer(data, np.uint8)
    return a[0::2].tobytes() + a[1::2].tobytes()


def byte_unshuffle(data: bytes) -> bytes:
    a, out = np.frombuffer(data, np.uint8), np.empty(len(data), np.uint8)
    half = (len(data) + 1) // 2
    out[0::2], out[1::2] = a[:half], a[half:]
    return out.tobytes()


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def brotli_pack(obj) -> bytes:
    import brotli
    return brotli.compress(byte_shuffle(saved(obj)), quality=BROTLI_QUALITY)


def brotli_unpack(data: bytes):
    import brotli
    return torch.load(io.BytesIO(byte_unshuffle(brotli.decompress(data))), map_location="cpu")


def lrzip_available() -> bool:
    return shutil.which("lrzip") is not None


def lrzip_version() -> str:
    if not lrzip_available():
        return "absent"
    r = subprocess.run(["lrzip", "-V"], capture_output=True, text=True)
    return (r.stdout + r.stderr).strip().splitlines()[0]


def lrzip(data: bytes, decompress=False) -> bytes:
    """lrzip through files, as #2135 runs it (-z -L 9 to compress). LRZIP=NOCONFIG: no lrzip.conf changes it."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.lrz" if decompress else "in"), os.path.join(d, "out")
        with open(src, "wb") as f:
            f.write(data)
        cmd = ["lrzip", "-d"] if decompress else list(LRZIP_COMPRESS)
        r = subprocess.run([*cmd, "-Q", "-f", "-o", dst, src], capture_output=True,
                           env=dict(os.environ, LRZIP="NOCONFIG"))
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode()[-300:]}")
        with open(dst, "rb") as f:
            return f.read()


def similarity_order(codes: np.ndarray) -> np.ndarray:
    """A greedy chain through the rows of an integer matrix: start at row 0, then always go to the nearest row (L1
    distance) not yet taken, the lowest index on a tie. Returns the rows in that order. O(rows^2 x cols); the rows
    already taken leave the search whenever they are half of it (the order of the rest, hence the tie-break, kept)."""
    n = codes.shape[0]
    order = np.zeros(n, np.int64)
    if n == 0:
        return order
    rows, index = codes.astype(np.int16), np.arange(n)
    left, taken = np.ones(n, bool), 0
    left[0], last, taken = False, rows[0].copy(), 1
    for k in range(1, n):
        if 2 * taken >= len(index):
            rows, index, left, taken = rows[left], index[left], np.ones(int(left.sum()), bool), 0
        dist = np.abs(rows - last).sum(axis=1)
        if taken:
            dist[~left] = np.iinfo(dist.dtype).max
        j = int(dist.argmin())
        order[k], left[j], last = index[j], False, rows[j].copy()
        taken += 1
    return order


# ---------------------------------------------------------------------------------------------------------------------
# The per-group container (#2135's algorithm, this file's own frame layout)

PG_MAGIC = b"PGgp"


def pergroup_pack(qstate, meta, matrices="lrzip") -> tuple[bytes, dict]:
    """(frame, sizes of its parts). matrices: 'lrzip' (as #2135) or 'brotli' (its fallback without lrzip).
    Frame: magic, u32 count, per matrix (u16 name length, name, u32 rows, u32 cols, rows x u16 row order), u8 matrix
    compressor (1 lrzip, 0 brotli), u32 length + the matrices' stream, u32 length + the brotli'd rest."""
    names = sorted(n for n, e in qstate.items() if "q" in e and e["q"].ndim == 2)
    head, stream = [PG_MAGIC, struct.pack("<I", len(names))], []
    for name in names:
        q = qstate[name]["q"].numpy()
        if q.shape[0] > 65536:
            raise ValueError(f"{name}: {q.shape[0]} rows do not fit a uint16 row order")
        order = similarity_order(q)
        stream.append(np.ascontiguousarray(q[order].T).tobytes())
        b = name.encode()
        head += [struct.pack("<H", len(b)), b, struct.pack("<II", *q.shape), order.astype("<u2").tobytes()]
    raw = b"".join(stream)
    if matrices == "lrzip":
        coded, method = lrzip(raw), 1
    else:
        import brotli
        coded, method = brotli.compress(raw, quality=BROTLI_QUALITY), 0
    rest = {f"{n}::{k}": e[k] for n, e in qstate.items() for k in ARRAY_KEYS
            if k in e and not (k == "q" and n in names)}
    rest_blob = brotli_pack(dict(arrays=rest, meta=meta))
    head = b"".join(head)
    frame = head + struct.pack("<BI", method, len(coded)) + coded + struct.pack("<I", len(rest_blob)) + rest_blob
    return frame, dict(codes=len(coded), rest=len(rest_blob), frame_and_row_orders=len(head) + 9)


def pergroup_unpack(frame: bytes) -> tuple[dict, dict]:
    """(quantized state, meta) of a pergroup_pack frame."""
    if frame[:4] != PG_MAGIC:
        raise ValueError("not a per-group frame")
    (count,), at, mats = struct.unpack_from("<I", frame, 4), 8, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", frame, at)
        name = frame[at + 2:at + 2 + length].decode()
        rows, cols = struct.unpack_from("<II", frame, at + 2 + length)
        at += 10 + length
        mats.append((name, rows, cols, np.frombuffer(frame, "<u2", rows, at).astype(np.int64)))
        at += 2 * rows
    method, size = struct.unpack_from("<BI", frame, at)
    coded = frame[at + 5:at + 5 + size]
    at += 5 + size
    (rest_size,) = struct.unpack_from("<I", frame, at)
    rest = brotli_unpack(frame[at + 4:at + 4 + rest_size])
    if method == 1:
        raw = lrzip(coded, decompress=True)
    else:
        import brotli
        raw = brotli.decompress(coded)
    meta, out, offset = rest["meta"], {}, 0
    for name, rows, cols, order in mats:
        block = np.frombuffer(raw, np.int8, rows * cols, offset).reshape(cols, rows).T
        offset += rows * cols
        q = np.empty((rows, cols), np.int8)
        q[order] = block  # row k of the block is the matrix's row order[k]
        out[name] = dict(q=torch.from_numpy(q))
    for key, t in rest["arrays"].items():
        name, _, k = key.partition("::")
        out.setdefault(name, {})[k] = t
    for name, fields in meta["fields"].items():
        out[name].update(fields)
    return out, meta


def torchsave_unpack(data: bytes) -> tuple[dict, dict]:
    obj = brotli_unpack(data)
    out = {}
    for key, t in obj["arrays"].items():
        name, _, k = key.partition("::")
        out.setdefault(name, {})[k] = t
    for name, fields in obj["meta"]["fields"].items():
        out[name].update(fields)
    return out, obj["meta"]


# ---------------------------------------------------------------------------------------------------------------------
# One method: encode, decode, compare

def coded_parts(blob: bytes) -> dict:
    """Our range-coded artifact: the coded words (the matrices' codes) and everything else."""
    side = int.from_bytes(blob[36:40], "little")
    return dict(codes=len(blob) - 40 - side, rest=40 + side)


def run_method(method, qstate, args, looping, matrices="lrzip") -> dict:
    """Bytes, compress and decompress seconds, and whether decoding gave back exactly `qstate`."""
    t0 = time.perf_counter()
    parts = None
    if method in ("constriction", "zstd"):
        a = dataclasses.replace(args, compressor=method, compress_level=22)
        blob = train_gpt.pack(qstate, a, looping)
        if method == "constriction":
            parts = coded_parts(blob)
        t1 = time.perf_counter()
        back = train_gpt.unpack(blob)[0]
    elif method == "pergroup":
        blob, parts = pergroup_pack(qstate, header_meta(qstate, args, looping), matrices)
        t1 = time.perf_counter()
        back = pergroup_unpack(blob)[0]
    elif method == "brotli":
        arrays = {f"{n}::{k}": e[k] for n, e in qstate.items() for k in ARRAY_KEYS if k in e}
        blob = brotli_pack(dict(arrays=arrays, meta=header_meta(qstate, args, looping)))
        t1 = time.perf_counter()
        back = torchsave_unpack(blob)[0]
    else:
        raise ValueError(f"unknown method {method!r}; use {', '.join(METHODS)}")
    t2 = time.perf_counter()
    diff = differences(qstate, back)
    return dict(bytes=len(blob), compress_s=round(t1 - t0, 2), decompress_s=round(t2 - t1, 2), lossless=not diff,
                mismatches=diff[:5], parts=parts, matrices=matrices if method == "pergroup" else None)


# ---------------------------------------------------------------------------------------------------------------------
# Command line: run (merge into a JSON) and report (Markdown)

def machine() -> str:
    import brotli
    import constriction
    import zstandard
    return (f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, 1 torch thread; "
            f"torch {torch.__version__}, Python {platform.python_version()}, constriction "
            f"{getattr(constriction, '__version__', '0.5.0')}, zstandard {zstandard.__version__}, "
            f"brotli {getattr(brotli, '__version__', '?')}, {lrzip_version()}")


def cmd_run(opts):
    env = dict(kv.split("=", 1) for kv in opts.env)
    source = (f"artifact:{opts.artifact}" if opts.artifact else f"checkpoint:{opts.checkpoint}" if opts.checkpoint
              else "synthetic")
    args = preset_args(env) if not opts.artifact else None
    qstate, args, looping, what = quantized_state(source, args, env, opts.seed)
    stats, fp = code_stats(qstate), fingerprint(qstate)
    shape = f"vocab {args.vocab_size}, {args.num_layers} x {args.model_dim}, MLP {args.mlp_mult:g}x"
    data = dict(source=source if not opts.artifact else f"artifact:{os.path.basename(opts.artifact)}",
                description=f"{opts.label}; {what}" if opts.label else what, shape=shape, preset=args.preset,
                fingerprint=fp, **stats)
    results = json.load(open(opts.json)) if opts.json and os.path.exists(opts.json) else dict(data=data, runs={})
    if results["data"]["fingerprint"] != fp:
        raise SystemExit(f"{opts.json} holds another quantized state ({results['data']['fingerprint'][:12]} vs "
                         f"{fp[:12]}); use another --json")
    if opts.artifact:  # our container of that state, written again: the same bytes as the run's file?
        again = train_gpt.pack(qstate, dataclasses.replace(args, compressor="constriction"), looping)
        data["repacked_identical"] = again == open(opts.artifact, "rb").read()
    results["data"] = data
    matrices = "lrzip" if lrzip_available() and not opts.no_lrzip else "brotli"
    print(f"{data['shape']}: {stats['tensors']} matrices, {stats['codes']:,} codes, entropy "
          f"{stats['entropy_bytes']:,.0f} bytes; {what}", flush=True)
    for method in opts.methods.split(","):
        r = run_method(method, qstate, args, looping, matrices)
        r.update(command="python bench/compress_compare.py " + " ".join(sys.argv[1:]),
                 date=datetime.date.today().isoformat(), machine=machine())
        results["runs"][method] = r
        print(f"{method}: {r['bytes']:,} bytes, compress {r['compress_s']}s, decompress {r['decompress_s']}s, "
              f"lossless {r['lossless']} {r['parts'] or ''}", flush=True)
        if opts.json:
            os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
            with open(opts.json, "w") as f:
                json.dump(results, f, indent=1)
    return results


LABELS = dict(constriction="ours: range coder (`COMPRESSOR=constriction`)",
              zstd="ours: `COMPRESSOR=zstd`, level 22",
              pergroup="#2135 per-group: row order + transpose, lrzip -z -L 9; rest brotli-11",
              brotli="torch.save + byte shuffle + brotli-11 (04-09 record)")


def table(results) -> list[str]:
    d, runs = results["data"], results["runs"]
    ours = runs.get("constriction")
    lines = ["| container | bytes | vs ours | int6 weights in that difference | codes part | vs codes' entropy | "
             "row orders + frame | rest | compress s | decompress s | lossless |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in METHODS:
        if m not in runs:
            continue
        r = runs[m]
        label = LABELS[m] if r.get("matrices") != "brotli" else \
            "#2135 per-group, **brotli-11 for the matrices, not lrzip**; rest brotli-11"
        vs = buys = ""
        if ours and m != "constriction":
            diff = r["bytes"] - ours["bytes"]
            vs, buys = f"{diff:+,}", f"{diff * 8 / d['int6_bits_per_code']:+,.0f}"
        p = r.get("parts") or {}
        codes, ent = (f"{p['codes']:,}", f"{100 * (p['codes'] / d['entropy_bytes'] - 1):+.3f}%") if p else \
            ("one stream", "")
        orders = f"{p['frame_and_row_orders']:,}" if "frame_and_row_orders" in p else ""
        rest = f"{p['rest']:,}" if p else ""
        lines.append(f"| {label} | {r['bytes']:,} | {vs} | {buys} | {codes} | {ent} | {orders} | {rest} | "
                     f"{r['compress_s']:.1f} | {r['decompress_s']:.1f} | "
                     f"{'yes' if r['lossless'] else 'NO: ' + ', '.join(r['mismatches'])} |")
    return lines


def split_line(results) -> list[str]:
    """Where the per-group frame's difference from ours comes from, part by part."""
    ours, pg = results["runs"].get("constriction"), results["runs"].get("pergroup")
    if not (ours and pg and ours.get("parts") and pg.get("parts")):
        return []
    a, b = ours["parts"], pg["parts"]
    return ["", f"Per-group minus ours, {pg['bytes'] - ours['bytes']:+,} bytes: codes part "
                f"{b['codes'] - a['codes']:+,}, row orders + frame {b['frame_and_row_orders']:+,}, rest "
                f"{b['rest'] - a['rest']:+,}."]


def cmd_report(opts):
    out = ["# Bytes: our range coder against #2135's per-group compressor (issue 17)", "",
           "Written by `python bench/compress_compare.py report` from the JSON files named under each table; every "
           "number comes from `bench/compress_compare.py run` (its docstring says what each container does). "
           "CPU only; times are wall seconds on a busy shared machine (lrzip runs at its default nice 19), read "
           "them as ratios.", ""]
    for path in opts.json:
        results = json.load(open(path))
        d, runs = results["data"], results["runs"]
        first = next(iter(runs.values()))
        out += [f"## {d['shape']} ({d['source']})", "",
                f"- **Data**: {d['description']}. Preset values: `PRESET={d['preset']}`.",
                f"- **Codes**: {d['tensors']} quantized matrices, {d['codes']:,} codes; their empirical entropy (one "
                f"histogram per tensor) {d['entropy_bytes']:,.0f} bytes; the int6 codes average "
                f"{d['int6_bits_per_code']:.3f} bits.",
                *([f"- **Our container written again** from that state: "
                   f"{'the same bytes as the file' if d['repacked_identical'] else 'NOT the same bytes as the file'}."]
                  if "repacked_identical" in d else []),
                f"- **Machine**: {first['machine']}.",
                f"- **Results file**: `{os.path.relpath(path, ROOT)}`. **Commands** (date):"]
        for cmd, date in dict.fromkeys((r["command"], r["date"]) for r in runs.values()):
            out.append(f"  - `{cmd}` ({date})")
        out += ["", *table(results), *split_line(results), "",
                "\"vs ours\": bytes more (+) or fewer (-) than our range-coded artifact; \"int6 weights in that "
                "difference\": the same at the int6 codes' average entropy (+: ours holds that many more int6 "
                "weights in the same bytes). \"codes part\": the matrices' codes alone (our coded words; the "
                "per-group frame's lrzip stream), against their entropy with one histogram per tensor. \"row orders "
                "+ frame\": the per-group frame's row orders (2 bytes a row, stored raw, as #2135 stores them) and "
                "its names and shapes. \"rest\": scales, LQER factors, the tensors kept in fp16/fp32 and the "
                "header (ours: lzma of our JSON header and raw arrays; per-group: torch.save, byte shuffle, "
                "brotli-11).", ""]
    text = "\n".join(out)
    if opts.md:
        with open(opts.md, "w") as f:
            f.write(text)
    print(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--methods", default=",".join(METHODS))
    r.add_argument("--artifact", help="a train_gpt.py artifact (.ptz): compare on its quantized state")
    r.add_argument("--checkpoint", help="a float state dict of the preset's model (torch.save)")
    r.add_argument("--env", nargs="*", default=[], help="KEY=VALUE over PRESET=frontier2135 (e.g. a smaller shape)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--label", help="what the data is, for the report (e.g. how the artifact was trained)")
    r.add_argument("--json", help="results file to merge into")
    r.add_argument("--no-lrzip", action="store_true", help="brotli-11 for the per-group matrices even with lrzip")
    s = sub.add_parser("report")
    s.add_argument("json", nargs="+")
    s.add_argument("--md")
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    return cmd_run(opts) if opts.cmd == "run" else cmd_report(opts)


if __name__ == "__main__":
    main()
