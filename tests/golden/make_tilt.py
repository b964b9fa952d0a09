"""Writes tilt2135.npz: #2135's online_ngram_state.c (token channel) on fixed streams; see README.md.
Usage: gcc -O2 -shared -fPIC -o libng.so online_ngram_state.c && python make_tilt.py libng.so tilt2135.npz"""
import sys
import ctypes, numpy as np
lib = ctypes.CDLL(sys.argv[1])
lib.online_ngram_state_create.restype = ctypes.c_void_p
lib.online_ngram_state_create.argtypes = [ctypes.c_int]*3
lib.online_ngram_state_seed_prefix_token.argtypes = [ctypes.c_void_p, ctypes.c_uint16]
P = ctypes.c_void_p
lib.online_ngram_state_process_chunk.argtypes = [P, P, ctypes.c_int64] + [P]*7
def run(targets, order):
    n = targets.size; t = np.ascontiguousarray(targets.astype(np.uint16))
    st = lib.online_ngram_state_create(order - 1, 16, 16)
    lib.online_ngram_state_seed_prefix_token(st, int(t[0]))
    z8 = np.zeros(65536, np.uint8)
    tok = np.zeros(n, np.uint16); prob = np.zeros(n, np.float32)
    a = np.zeros(n, np.uint16); b = np.zeros(n, np.float32); c = np.zeros(n, np.uint8)
    rc = lib.online_ngram_state_process_chunk(st, t.ctypes.data, n, z8.ctypes.data, z8.ctypes.data, tok.ctypes.data, prob.ctypes.data, a.ctypes.data, b.ctypes.data, c.ctypes.data)
    assert rc == 0
    return tok, prob
rng = np.random.default_rng(2135)
phrases = [rng.integers(0, 50, rng.integers(5, 40)) for _ in range(12)]
parts = []
for _ in range(300):
    parts.append(phrases[rng.integers(12)])
    parts.append(rng.integers(0, 50, rng.integers(0, 3)))
seq = np.concatenate(parts)[:6000]
small = rng.integers(0, 4, 3000)
out = {"seq": seq.astype(np.int64), "small": small.astype(np.int64)}
for name, s in (("seq", seq), ("small", small)):
    for order in (16, 3, 1):
        tok, prob = run(s, order)
        out[f"{name}_o{order}_tok"] = tok.astype(np.int64); out[f"{name}_o{order}_prob"] = prob
        print(name, order, (prob >= np.float32(0.8)).sum(), (prob > 0).sum())
np.savez_compressed(sys.argv[2], **out)
