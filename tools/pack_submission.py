"""Packs train_gpt.py into a records-ready folder: a self-extracting train_gpt.py that runs identically, smaller.

Usage:
  python tools/pack_submission.py OUT_DIR                  # 1. the packed train_gpt.py, README.md stub, requirements.txt
  (cd OUT_DIR && RUN_ID=... torchrun ... train_gpt.py)     # 2. run the packed file: bytes_code is its size
  python tools/pack_submission.py OUT_DIR --run logs/RUN_ID   # 3. add that run's log, summary and submission.json
  python tools/pack_submission.py --unpack OUT_DIR/train_gpt.py   # print the readable source a packed file runs

The packed file is `import lzma, base64; exec(...)` of the lzma-compressed (xz, with its CRC), base85-encoded
source, compiled as `__main__` in the file's own globals, so `__file__` is the packed file: the run logs and counts
the bytes of the file that actually ran. Packing is deterministic (same source, same bytes) and the readable source
stays canonical; its SHA-256 is written in the stub's first line.

Why a tool and not `train_gpt.py --pack`: the counted file should hold only what a run needs (design.md), and
step 3 must check that the run's logged code hash is the packed file's, which a script packing itself could not
guard against a run of the unpacked source (whose bytes_code would not be the shipped file's).
"""
import argparse
import ast
import base64
import hashlib
import json
import lzma
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "pack_submission.py"
STUB = ("# packed train_gpt.py (tools/pack_submission.py), source sha256 {sha}\n"
        "import lzma,base64\n"
        "exec(compile(lzma.decompress(base64.b85decode({blob!r})),'<packed train_gpt.py>','exec'))\n")


class PackError(Exception):
    pass


def pack_source(source: bytes) -> bytes:
    """The self-extracting wrapper of `source` (bytes of a Python file)."""
    blob = base64.b85encode(lzma.compress(source, preset=9 | lzma.PRESET_EXTREME))
    return STUB.format(sha=hashlib.sha256(source).hexdigest(), blob=blob).encode()


def unpack_source(packed: bytes) -> bytes:
    """The source a packed file runs (the inverse of pack_source)."""
    lines = packed.decode().splitlines()
    if len(lines) != 3 or not lines[0].startswith("# packed train_gpt.py"):
        raise PackError("not a file written by pack_submission.py")
    start = lines[2].index("b'")  # the base85 alphabet has no quote: the literal ends at the next one
    return lzma.decompress(base64.b85decode(ast.literal_eval(lines[2][start:lines[2].index("'", start + 2) + 1])))


README_STUB = """# {name}

Packed `train_gpt.py`: {packed:,} bytes (source {source:,} bytes, sha256 `{sha}`). It is the self-extracting form of
the readable source; `python tools/pack_submission.py --unpack train_gpt.py` prints it.

- Command: `RUN_ID=... torchrun --standalone --nproc_per_node=8 train_gpt.py` (settings: the run's log, `config:` line)
- Dependencies: `pip install -r requirements.txt`
- Results: fill in from `submission.json` (val_bpb, bytes_total, hardware) once the run is added.
"""


def write_folder(out_dir, source_path):
    source = open(source_path, "rb").read()
    packed = pack_source(source)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train_gpt.py"), "wb") as f:
        f.write(packed)
    shutil.copyfile(os.path.join(ROOT, "requirements.txt"), os.path.join(out_dir, "requirements.txt"))
    readme = os.path.join(out_dir, "README.md")
    if not os.path.exists(readme):  # a README being written by hand is never replaced
        with open(readme, "w") as f:
            f.write(README_STUB.format(name=os.path.basename(os.path.abspath(out_dir)), packed=len(packed),
                                       source=len(source), sha=hashlib.sha256(source).hexdigest()))
    print(f"{out_dir}/train_gpt.py: {len(packed):,} bytes packed from {len(source):,} "
          f"({hashlib.sha256(source).hexdigest()[:16]}); run it there, then add the run with --run")


def add_run(out_dir, run):
    """Copies RUN's log and summary, and its submission as submission.json, after checking the run ran the packed
    file (the log's first line holds the SHA-256 prefix of the file that ran)."""
    run = run[:-len(".txt")] if run.endswith(".txt") else run[:-len(".json")] if run.endswith(".json") else run
    packed_path = os.path.join(out_dir, "train_gpt.py")
    files = {"log": run + ".txt", "summary": run + ".json", "submission": run + ".submission.json"}
    for kind, path in [("packed file", packed_path)] + list(files.items()):
        if not os.path.isfile(path):
            raise PackError(f"{path} not found ({kind}); pack OUT_DIR first, then run its train_gpt.py")
    first = open(files["log"]).readline()
    logged = dict(kv.split(":", 1) for kv in first.split() if ":" in kv)
    packed = open(packed_path, "rb").read()
    if logged.get("code_sha256") != hashlib.sha256(packed).hexdigest()[:16] or int(logged["code_bytes"]) != len(packed):
        raise PackError(f"{files['log']} was not made by {packed_path} (its code_bytes/code_sha256 differ); "
                        "run the packed file so bytes_code counts what ships")
    sub = json.load(open(files["submission"]))
    if sub.get("bytes_code") != len(packed):
        raise PackError(f"{files['submission']}: bytes_code {sub.get('bytes_code')} is not {len(packed)}")
    for kind, path in files.items():
        dest = "submission.json" if kind == "submission" else os.path.basename(path)
        shutil.copyfile(path, os.path.join(out_dir, dest))
    print(f"{out_dir}: added {', '.join(os.path.basename(p) for p in files.values())} "
          f"(val_bpb {sub.get('val_bpb')}, bytes_total {sub.get('bytes_total')})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    ap.add_argument("out_dir", nargs="?", help="the records folder to write")
    ap.add_argument("--source", default=os.path.join(ROOT, "train_gpt.py"), help="the readable source to pack")
    ap.add_argument("--run", help="logs/<RUN_ID> of a run of the packed file, to add to the folder")
    ap.add_argument("--unpack", metavar="PACKED", help="print the source a packed train_gpt.py runs")
    args = ap.parse_args(argv)
    try:
        if args.unpack:
            sys.stdout.buffer.write(unpack_source(open(args.unpack, "rb").read()))
        elif not args.out_dir:
            ap.error("give OUT_DIR (or --unpack FILE)")
        elif args.run:
            add_run(args.out_dir, args.run)
        else:
            write_folder(args.out_dir, args.source)
    except (PackError, OSError, ValueError, lzma.LZMAError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
