#!/usr/bin/env python3
"""Writes libsodium.json: reference outputs from the system libsodium (libsodium.so.23).

The claudemesh clients use libsodium (libsodium-wrappers). The Rust test client must be
byte-identical to it, so the integration tests check it against these vectors. Needs only
ctypes and the system library; the JSON is committed so CI needs neither.
Run: python3 tests/vectors/gen_libsodium_vectors.py > tests/vectors/libsodium.json
"""
import ctypes, ctypes.util, hashlib, json

lib = ctypes.CDLL(ctypes.util.find_library("sodium") or "libsodium.so.23")
assert lib.sodium_init() >= 0
lib.sodium_version_string.restype = ctypes.c_char_p
buf = ctypes.create_string_buffer
ull = ctypes.c_ulonglong

def det(label, n):
    """Deterministic bytes so the file is reproducible."""
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}:{i}".encode()).digest()
        i += 1
    return out[:n]

def keypair(seed):
    pk, sk = buf(32), buf(64)
    assert lib.crypto_sign_seed_keypair(pk, sk, seed) == 0
    return pk.raw, sk.raw

def sign(sk, msg):
    sig = buf(64)
    assert lib.crypto_sign_detached(sig, None, msg, ull(len(msg)), sk) == 0
    return sig.raw

def x25519(pk, sk):
    xpk, xsk = buf(32), buf(32)
    assert lib.crypto_sign_ed25519_pk_to_curve25519(xpk, pk) == 0
    assert lib.crypto_sign_ed25519_sk_to_curve25519(xsk, sk) == 0
    return xpk.raw, xsk.raw

cases = []
for i in range(3):
    a_pk, a_sk = keypair(det(f"alice{i}", 32))
    b_pk, b_sk = keypair(det(f"bob{i}", 32))
    msg = f"hello from alice #{i} — ünïcödé".encode()
    hello = f"meshid{i}|memberid{i}|{a_pk.hex()}|177559920{i:04d}".encode()
    a_xpk, a_xsk = x25519(a_pk, a_sk)
    b_xpk, b_xsk = x25519(b_pk, b_sk)
    nonce = det(f"nonce{i}", 24)
    c = buf(len(msg) + 16)
    assert lib.crypto_box_easy(c, msg, ull(len(msg)), nonce, b_xpk, a_xsk) == 0
    cases.append({
        "alice_secret_key": a_sk.hex(), "alice_pubkey": a_pk.hex(),
        "bob_secret_key": b_sk.hex(), "bob_pubkey": b_pk.hex(),
        "hello_message": hello.decode(), "hello_signature": sign(a_sk, hello).hex(),
        "alice_x25519_pk": a_xpk.hex(), "alice_x25519_sk": a_xsk.hex(),
        "bob_x25519_pk": b_xpk.hex(),
        "box_message": msg.hex(), "box_nonce": nonce.hex(), "box_alice_to_bob": c.raw.hex(),
    })
print(json.dumps({"source": "libsodium " + lib.sodium_version_string().decode(), "cases": cases}, indent=1))
