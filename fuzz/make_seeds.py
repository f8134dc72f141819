#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/corpus/<target>/ (real
examples: valid batches, control messages, upgrade request heads with an RS256 token, a
JWKS with one key of each allowed kind, the shipped recording truncated). The committed
corpus grew from these and was minimized with `cargo fuzz cmin` (docs/fuzzing.md).
Needs python3-cryptography."""
import struct, os, json, base64, time
from cryptography.hazmat.primitives.asymmetric import rsa, ec, ed25519, padding
from cryptography.hazmat.primitives import hashes, serialization
here = os.path.dirname(os.path.abspath(__file__))
root = os.path.join(here, 'corpus')
def w(t, name, data):
    d = os.path.join(root, t); os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), 'wb').write(data if isinstance(data, bytes) else data.encode())

def rec(rtype, feed, instr, seq, ts=1_700_000_000_000_000_000, recv=0, body=(150_000_000_000, 3_000_000_000, 1), flags=0):
    h = struct.pack('<BBHIQqq', 56 if rtype == 1 else 72, rtype, feed, instr, seq, ts, recv)
    if rtype == 1:
        b = struct.pack('<qQB', *body) + bytes([flags]) + bytes(6)
    else:
        b = struct.pack('<qQqQ', 150_000_000_000, 100, 150_010_000_000, 200) + bytes([flags]) + bytes(7)
    return h + b
def batch(recs, ts=1_700_000_000_000_000_123):
    return struct.pack('<BBHIQ', 1, 0, len(recs), 0, ts) + b''.join(recs)

# publish: feed 7, instruments 1..4
w('publish', 'trade_quote', batch([rec(1, 7, 1, 0), rec(2, 7, 2, 0)]))
w('publish', 'explicit_seqs', batch([rec(1, 7, 1, 5), rec(1, 7, 1, 6), rec(2, 7, 4, 100), rec(2, 7, 3, 1)]))
w('publish', 'seq_backwards', batch([rec(1, 7, 1, 9), rec(1, 7, 1, 3)]))
w('publish', 'seq_max', batch([rec(1, 7, 2, 2**64 - 1), rec(1, 7, 2, 0)]))
w('publish', 'wrong_feed', batch([rec(1, 8, 1, 0)]))
# batch (client decoder): any feed, plus an unknown rtype skipped by its length
unk = struct.pack('<BBHIQqq', 40, 9, 1, 1, 1, 0, 0) + bytes(8)
w('batch', 'mixed', batch([rec(1, 1, 1, 1), unk, rec(2, 1, 2, 1, flags=1)]))
w('batch', 'one_trade', batch([rec(1, 2, 3, 4)]))

# control messages (client and server)
ctl = {
 'subscribe': '{"op":"subscribe","id":1,"feed":"XNAS","symbols":["AAPL","MSFT"],"snapshot":true,"resume":{"AAPL":1234},"epoch":7}',
 'unsubscribe': '{"op":"unsubscribe","id":2,"feed":"XNAS","symbols":["*"]}',
 'refresh': '{"op":"refresh","id":3,"token":"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"}',
 'ping': '{"op":"ping","id":4}',
 'auth': '{"op":"auth","token":"a.b.c"}',
 'bad_op': '{"op":"nope","id":5}',
 'bad_id': '{"op":"ping","id":"x"}',
}
for k, v in ctl.items(): w('control', k, v)

# upgrade: real request heads
def jwt(claims):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    enc = lambda o: base64.urlsafe_b64encode(json.dumps(o, separators=(',', ':')).encode()).rstrip(b'=').decode()
    si = enc({"alg": "RS256", "typ": "at+jwt", "kid": "k1"}) + '.' + enc(claims)
    sig = key.sign(si.encode(), padding.PKCS1v15(), hashes.SHA256())
    return si + '.' + base64.urlsafe_b64encode(sig).rstrip(b'=').decode()
now = int(time.time())
tok = jwt({"iss": "http://fuzz", "sub": "demo", "aud": "tickgate", "iat": now, "exp": now + 300, "jti": "j1", "scope": "md:read:*", "client_id": "demo"})
base = ["Host: localhost:8080", "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]
def head(first, extra): return '\r\n'.join([first] + base + extra) + '\r\n\r\n'
w('upgrade', 'authorization', head('GET /v1/stream HTTP/1.1', ["Sec-WebSocket-Protocol: tickgate.v1", "Authorization: Bearer " + tok, "Origin: https://app.example"]))
w('upgrade', 'subprotocol', head('GET /v1/stream HTTP/1.1', ["Sec-WebSocket-Protocol: tickgate.v1, bearer." + tok]))
w('upgrade', 'ticket', head('GET /v1/stream?ticket=abcDEF123 HTTP/1.1', ["Sec-WebSocket-Protocol: tickgate.v1"]))
w('upgrade', 'publish', head('GET /v1/publish?feed=F&epoch=3 HTTP/1.1', ["Sec-WebSocket-Protocol: tickgate.v1", "Authorization: bearer " + tok]))
w('upgrade', 'inband', head('GET /v1/stream HTTP/1.1', ["Sec-WebSocket-Protocol: tickgate.v1"]))
# token: the bare token
w('token', 'rs256', tok)
w('token', 'alg_none', 'eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.')

# jwks: one usable key of each kind, plus refused ones
def b64u(b): return base64.urlsafe_b64encode(b).rstrip(b'=').decode()
def ib(i, n=None):
    n = n or (i.bit_length() + 7) // 8
    return i.to_bytes(n, 'big')
r = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()
e256 = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
e384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
keys = [
 {"kty": "RSA", "kid": "rsa1", "use": "sig", "alg": "RS256", "n": b64u(ib(r.n)), "e": b64u(ib(r.e))},
 {"kty": "EC", "kid": "ec256", "crv": "P-256", "alg": "ES256", "x": b64u(ib(e256.x, 32)), "y": b64u(ib(e256.y, 32))},
 {"kty": "EC", "kid": "ec384", "crv": "P-384", "x": b64u(ib(e384.x, 48)), "y": b64u(ib(e384.y, 48))},
 {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "alg": "EdDSA", "x": b64u(ed)},
]
w('jwks', 'all_kinds', json.dumps({"keys": keys}))
w('jwks', 'refused', json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}, {"kty": "RSA", "kid": "weak", "n": "AQAB", "e": "AQAB"}, {"kty": "RSA", "kid": "ps", "alg": "PS256", "use": "enc", "n": keys[0]["n"], "e": "AQAB"}]}))
w('jwks', 'one_ec', json.dumps({"keys": [keys[1]]}))

# recording: the shipped sample, truncated (header + a few records), and a cut record
s = open(os.path.join(here, '..', 'feeds', 'sample.tgrec'), 'rb').read()
mlen = struct.unpack('<I', s[8:12])[0]
hdr = 12 + mlen + (8 - (12 + mlen) % 8) % 8
w('recording', 'sample_head', s[:hdr + 56 * 6])
w('recording', 'sample_cut', s[:hdr + 100])
w('recording', 'header_only', s[:hdr])
