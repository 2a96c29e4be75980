"""Token ids as the text a reader sees: each token's share of the decoded sequence.

A byte-level tokenizer may split one UTF-8 character over several tokens. Such a token has no text
of its own: `token_texts` gives it its bytes instead, and the token that completes the character
carries the whole character, so that the texts of a row, joined, are its decoded text.
"""
from __future__ import annotations

import functools
import re

PREFIX_TOKENS = 4  # tokens decoded before a token, so that a decoder's first-token rules (a leading space) do not apply
MAX_PENDING = 4  # a UTF-8 character has at most 4 bytes: past that, the bytes are invalid and shown as decoded
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for: a byte-fallback token's byte, a byte-level token's bytes, or the
    UTF-8 of its vocabulary string (SentencePiece's '▁' as a space)."""
    tok = tokenizer.convert_ids_to_tokens(int(token_id)) or ""
    m = BYTE_TOKEN.fullmatch(tok)
    if m:
        return bytes([int(m.group(1), 16)])
    table = byte_decoder()
    if all(c in table for c in tok):
        return bytes(table[c] for c in tok)
    return tok.replace("\u2581", " ").encode()


def decoder(tokenizer):
    """ids -> text with every token kept (special tokens included) and no clean-up of spaces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust decoder: the same text, without transformers' per-call overhead
        return lambda ids: backend.decode(ids, skip_special_tokens=False)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_texts(tokenizer, ids: list[int], decode=None) -> tuple[list[str], dict[int, str]]:
    """Each token's text, and {position: its bytes as hex} for the tokens that end inside a character
    (their text is ""; the token that completes the character carries all of it)."""
    decode = decode or decoder(tokenizer)
    texts, partial = [], {}
    start = 0  # first token whose text is not given yet
    for i in range(len(ids)):
        p = max(0, start - PREFIX_TOKENS)
        base = decode(ids[p:start]) if p < start else ""
        full = decode(ids[p:i + 1])
        new = full[len(base):] if full.startswith(base) else decode(ids[start:i + 1])
        if new.endswith("\ufffd") and i + 1 - start < MAX_PENDING and not token_is_replacement_char(tokenizer, ids[i]):
            partial[i] = token_bytes(tokenizer, ids[i]).hex(" ")
            texts.append("")
            continue
        texts.append(new)
        start = i + 1
    return texts, partial


def token_is_replacement_char(tokenizer, token_id: int) -> bool:
    """A token that really is U+FFFD (its bytes are the character's own), not a broken one."""
    return token_bytes(tokenizer, token_id).endswith("\ufffd".encode())
