"""Packs train_gpt.py into a records-ready folder: a self-extracting train_gpt.py that runs identically, smaller.

Usage:
  python tools/pack_submission.py OUT_DIR                  # 1. the packed train_gpt.py, README.md stub, requirements.txt
  (cd OUT_DIR && RUN_ID=... torchrun ... train_gpt.py)     # 2. run the packed file: bytes_code is its size
  python tools/pack_submission.py OUT_DIR --run logs/RUN_ID   # 3. add that run's log, summary and submission.json
  python tools/pack_submission.py --unpack OUT_DIR/train_gpt.py   # print the program a packed file runs
  python tools/pack_submission.py --check OUT_DIR/train_gpt.py    # exit 0 iff it runs the stripped --source

The packed program is the readable source with its docstrings and comments stripped (ast.parse, drop every string
statement, ast.unparse), argument and return annotations dropped outside Triton kernels and custom ops, and names shortened by
python-minifier (program_of). Packing refuses a source whose stripped AST the unparsed text does not reproduce, or
that reads docstrings or source text at run time. That program is brotli-compressed (quality 11), written in base
252 as the characters of a triple-quoted latin-1 string literal (the stub's first line declares `coding:latin-1`;
every character but NUL, CR, quote and backslash, so nothing is escaped), decoded by the stub's one-line loop and
`exec`'d as `__main__` in the stub's own globals, so `__file__` is the packed file: the run logs and counts the
bytes of the file that actually ran. README.md has the measured sizes: brotli takes ~3% off bz2, the
smallest stdlib decoder, at the cost of the `brotli` package at run time (the SOTA's stub needs it too).

The readable source stays canonical: the packed file is a build output. Its first line holds the source's SHA-256
(16 hex digits; the folder's README.md all 64), packing is deterministic (same source and Python version, same
bytes), --unpack prints the program it runs, and --check compares that program's AST with the stripped source's. Packed by Python 3.11, the program also parses on
3.10, 3.12 and 3.13 (measured); packed by 3.12+, it may need 3.12+ (f-strings), which packing warns about.

Why a tool and not `train_gpt.py --pack`: the counted file should hold only what a run needs, and
step 3 must check that the run's logged code hash is the packed file's, which a script packing itself could not
guard against a run of the unpacked source (whose bytes_code would not be the shipped file's).
"""
import argparse
import ast
import brotli
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
PROG = "pack_submission.py"
HEADER = "# coding:latin-1 | packed by tools/pack_submission.py, source sha256 "  # then its first 16 hex digits (the
# folder's README.md has all 64)
# The program is put in linecache under its code's file name, so what reads a function's source at run time finds it:
# Triton's @triton.jit does ("@jit functions should be defined in a Python file" without it).
BODY = ("import brotli,linecache as c\nn=0\nfor b in {blob}.encode('latin1'):n=n*252+b-(b>0)-(b>13)-(b>39)-(b>92)\n"
        "s=brotli.decompress(n.to_bytes({size},'big')).decode();f='<packed train_gpt.py>';"
        "c.cache[f]=(len(s),None,s.splitlines(1),f)\nexec(compile(s,f,'exec'))\n")
# Names whose run-time result stripping would change: the program must not read its own docstrings or source.
READS_OWN_TEXT = {"__doc__", "getdoc", "getsource", "getsourcelines", "getcomments", "linecache"}


class PackError(Exception):
    pass


def strip_tree(source: bytes) -> ast.Module:
    """The AST of `source` without string statements (docstrings, bare strings): a body left empty gets `pass`."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) \
            else node.name if isinstance(node, ast.alias) else None
        if name in READS_OWN_TEXT:
            raise PackError(f"the source uses {name} (line {getattr(node, 'lineno', '?')}), whose result "
                            "stripping docstrings would change; read the text some other way")
        for field, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                kept = [s for s in value if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                  and isinstance(s.value.value, str))]
                setattr(node, field, kept or [ast.Pass()])
    return tree


# python-minifier (the SOTA's "pyminify"), pinned in requirements.txt: local and module-level names shortened (the
# program reads none of them by name: no globals(), vars() or getattr on the module), variable annotations dropped.
# What a run may read by name stays: attributes, keyword and dataclass field names, class attribute annotations
# (dataclass and NamedTuple fields). Argument and return annotations are dropped before it (drop_annotations),
# except in @triton.jit kernels, whose `tl.constexpr` annotations Triton reads, and torch.library.custom_op functions.
MINIFY_VERSION = "3.4.0"
MINIFY = dict(remove_literal_statements=True, rename_locals=True, rename_globals=True, hoist_literals=False)
KEEP_ANNOTATIONS = dict(remove_variable_annotations=True, remove_return_annotations=False,
                        remove_argument_annotations=False, remove_class_attribute_annotations=False)


def drop_annotations(tree: ast.Module) -> ast.Module:
    """Removes the argument and return annotations of every function but Triton kernels (decorated with a .jit) and
    torch.library custom ops (whose schema torch infers from them)."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and not any(
                "jit" in ast.unparse(d) or "custom_op" in ast.unparse(d) for d in fn.decorator_list):
            a = fn.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                arg.annotation = None
            fn.returns = None
    return tree


def program_of(source: bytes) -> bytes:
    """What a packed file runs: strip_source(source) without argument and return annotations (drop_annotations),
    its names shortened by python-minifier."""
    try:
        installed = importlib.metadata.version("python-minifier")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != MINIFY_VERSION:  # another version may write another program: --check would not match
        raise PackError(f"packing needs python-minifier {MINIFY_VERSION} (installed: {installed}); "
                        f"pip install python-minifier=={MINIFY_VERSION}")
    import python_minifier as pm
    stripped = ast.unparse(drop_annotations(ast.parse(strip_source(source)))) + "\n"
    program = pm.minify(stripped, remove_annotations=pm.RemoveAnnotationsOptions(**KEEP_ANNOTATIONS), **MINIFY) + "\n"
    compile(program, "<packed train_gpt.py>", "exec")
    return program.encode()


def strip_source(source: bytes) -> bytes:
    """The program a packed file runs: ast.unparse of strip_tree(source), checked to parse back to that tree."""
    tree = strip_tree(source)
    program = ast.unparse(tree) + "\n"
    if ast.dump(ast.parse(program)) != ast.dump(tree):
        raise PackError("ast.unparse does not reproduce the stripped source (a Python bug?); pack with another "
                        "Python version")
    return program.encode()


# The compressed blob, read as one big-endian number, is written in base 252 by the latin-1 characters that a
# triple-quoted literal holds as themselves: all but NUL (a source cannot hold it), CR (Python reads a raw CR as a
# line end), the quote (no run of three ends the literal) and the backslash (no escapes). Digit d is the d-th of them,
# so the stub decodes a character b as b - (b > 0) - (b > 13) - (b > 39) - (b > 92), and the blob's byte count
# (a literal in the stub) keeps its leading zero bytes. 8 / log2(252) = 1.0029: 0.29% over the compressed bytes,
# where escaping NUL, CR, backslash and quote cost 1.6% (~3 bytes in 256 escaped, each taking two).
DIGITS = bytes(b for b in range(256) if b not in (0, 13, ord("'"), ord("\\")))


def base252_literal(data: bytes) -> str:
    """A triple-quoted str literal whose characters are the base-252 digits (DIGITS) of int.from_bytes(data)."""
    n, out = int.from_bytes(data, "big"), []
    while n:
        n, d = divmod(n, len(DIGITS))
        out.append(DIGITS[d])
    return "'''" + bytes(reversed(out)).decode("latin-1") + "'''"


def from_base252(text: str, size: int) -> bytes:
    """The bytes a stub decodes from the characters `text` of its literal (its loop, here)."""
    n = 0
    for b in text.encode("latin-1"):
        n = n * 252 + b - (b > 0) - (b > 13) - (b > 39) - (b > 92)
    return n.to_bytes(size, "big")


def pack_source(source: bytes) -> bytes:
    """The self-extracting wrapper of `source` (bytes of a Python file)."""
    blob = brotli.compress(program_of(source), quality=11)
    body = BODY.format(blob=base252_literal(blob), size=len(blob))
    return (HEADER + hashlib.sha256(source).hexdigest()[:16] + "\n" + body).encode("latin-1")


def unpack_source(packed: bytes) -> bytes:
    """The program a packed file runs (program_of the source it was packed from)."""
    text = packed.decode("latin-1")
    head, _, rest = text.partition("\n")  # not splitlines: it would also split at latin-1 \x85, \x1c...
    body = re.escape(BODY).replace(re.escape("{blob}"), "'''([^']*)'''").replace(re.escape("{size}"), r"([0-9]+)")
    match = re.fullmatch(body, rest, re.DOTALL)
    if not (head.startswith(HEADER) and match):
        raise PackError("not a file written by pack_submission.py; give a packed train_gpt.py")
    try:
        return brotli.decompress(from_base252(match[1], int(match[2])))
    except (brotli.error, OverflowError) as e:
        raise PackError(f"the packed program does not decompress ({e}); the file is damaged") from None


def check_packed(packed_path, source_path) -> str:
    """The line saying that `packed_path` runs program_of(source), else PackError. The ASTs are compared, so a
    file packed by another Python version, whose ast.unparse may write the same program differently, still matches."""
    packed, source = open(packed_path, "rb").read(), open(source_path, "rb").read()
    program = unpack_source(packed)
    if ast.dump(ast.parse(program)) != ast.dump(ast.parse(program_of(source))):
        raise PackError(f"does not run {source_path} stripped (the programs differ; --unpack shows the packed one); "
                        "pack again")
    named, sha = packed.split(b"\n", 1)[0].decode("latin-1")[len(HEADER):], hashlib.sha256(source).hexdigest()[:16]
    note = "" if named == sha else f" (packed from {named[:16]}, not {sha[:16]}: only docstrings or comments differ)"
    return f"{packed_path} runs {source_path} stripped{note}"


README_STUB = """# {name}

Packed `train_gpt.py`: {packed:,} bytes (source {source:,} bytes, sha256 `{sha}`). It is the self-extracting form of
the readable source with docstrings and comments stripped; `python tools/pack_submission.py --unpack train_gpt.py`
prints the program it runs, `--check train_gpt.py --source SOURCE` compares it with a readable source.

- Command: `RUN_ID=... torchrun --standalone --nproc_per_node=8 train_gpt.py` (settings: the run's log, `config:` line)
- Dependencies: `pip install -r requirements.txt`
- Results: fill in from `submission.json` (val_bpb, bytes_total, hardware) once the run is added.
"""


def check_out_dir(out_dir):
    """Refuses, before anything is written, a folder where the packed train_gpt.py would replace a readable source
    or the file an existing run ran."""
    target, logs = os.path.join(out_dir, "train_gpt.py"), os.path.join(out_dir, "logs")
    if os.path.realpath(out_dir) in (os.path.realpath(ROOT), os.path.realpath(TOOLS)):
        raise PackError(f"{out_dir} is the repository's own folder, whose train_gpt.py packing would replace; "
                        "give a new records folder, e.g. records/my_run")
    if os.path.exists(os.path.join(out_dir, "submission.json")) or (os.path.isdir(logs) and os.listdir(logs)):
        raise PackError(f"{out_dir} already holds a run (submission.json or logs/), which a new train_gpt.py would "
                        "leave describing another file; pack into a new folder")
    if os.path.exists(target) and open(target, "rb").read(len(HEADER)) != HEADER.encode():
        raise PackError(f"{target} is not a packed file (a readable source?) and packing would replace it; "
                        "pack into a new folder")


def write_folder(out_dir, source_path):
    check_out_dir(out_dir)
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
    if sys.version_info >= (3, 12):  # measured: 3.12's and 3.13's unparse reuse a quote inside an f-string
        print(f"{PROG}: warning: packed by Python {sys.version.split()[0]}, whose ast.unparse may write f-strings "
              "that Python 3.11 and older cannot parse; run it on 3.12+, or pack with 3.11", file=sys.stderr)


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
    ap.add_argument("--unpack", metavar="PACKED", help="print the program a packed train_gpt.py runs")
    ap.add_argument("--check", metavar="PACKED", help="exit 0 iff PACKED runs --source stripped (one line)")
    args = ap.parse_args(argv)
    try:
        if args.unpack:
            sys.stdout.buffer.write(unpack_source(open(args.unpack, "rb").read()))
        elif args.check:
            print(check_packed(args.check, args.source))
        elif not args.out_dir:
            ap.error("give OUT_DIR (or --unpack FILE, --check FILE)")
        elif args.run:
            add_run(args.out_dir, args.run)
        else:
            write_folder(args.out_dir, args.source)
    except (PackError, OSError, ValueError, SyntaxError) as e:
        named = args.unpack or args.check
        print(f"{PROG}: error: {named + ': ' if named and isinstance(e, PackError) else ''}{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
