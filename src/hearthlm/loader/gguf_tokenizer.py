"""A `tokenizers` object from GGUF metadata (tokenizer.ggml.*) for byte-level BPE ("gpt2") vocabularies.

The vocabulary and merges come from the file; how text is split before the merges is named by tokenizer.ggml.pre
and taken from llama.cpp's table (llama-vocab.cpp), which mirrors each family's own tokenizer.json. The rest follows
transformers' GGUF converter (integrations/gguf/gguf_tokenizer_mapping.py): tokens outside the byte alphabet are
re-spelled in it, control tokens become special added tokens, user-defined ones plain added tokens.

Anything this cannot reproduce (SentencePiece "llama" vocabularies, unknown pre-tokenizers, files without merges)
returns None, and the caller uses transformers' converter instead."""
from __future__ import annotations

from typing import Any

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

GPT2_SPLIT = "gpt2"  # the GPT-2 regex, built into tokenizers' ByteLevel pre-tokenizer
DIGITS_THEN_GPT2 = "digits+gpt2"  # every \p{N} on its own, then the GPT-2 regex (llama.cpp: "\\p{N}" first)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> split, for the names llama.cpp and transformers agree on (plus the digit-splitting family)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), GPT2_SPLIT),
    # StarCoder-style vocabularies (SmolLM, StarCoder, Refact, Command-R, ...): digits one by one. transformers'
    # GGUF converter splits these with the plain GPT-2 regex, which differs when whitespace precedes a digit
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), GPT4O_SPLIT),
}


def byte_level_bpe(metadata: dict[str, Any]):
    """(tokenizers.Tokenizer, {name: token} of the named special tokens) or None when not reproducible here."""
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        return None
    split = PRE_TOKENIZER_SPLITS.get(str(metadata.get("tokenizer.ggml.pre", "default")))
    tokens, merges = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.merges")
    if split is None or not isinstance(tokens, list) or not tokens or not isinstance(merges, list) or not merges:
        return None
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from tokenizers import Tokenizer as RawTokenizer

    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        return None
    # Llama-3's family: a piece that is itself in the vocabulary is one token (tokenizer.json's ignore_merges,
    # llama.cpp's tokenizer_ignore_merges), and BOS is added unless the file says otherwise. transformers' GGUF
    # converter does neither
    llama3 = split == LLAMA3_SPLIT
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False, ignore_merges=llama3))
    if split == GPT2_SPLIT:
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif split == DIGITS_THEN_GPT2:
        raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    raw.decoder = decoders.ByteLevel()

    # transformers' GPT-2 class makes <|endoftext|> special (its default unk/bos/eos) whatever the file says
    if "<|endoftext|>" in vocab:
        raw.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    types = metadata.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == CONTROL and set(t) <= alphabet]
    if control:  # a control token spelled outside the byte alphabet is a llama.cpp mislabel: skipped, like HF
        raw.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab]
    if user:
        raw.add_tokens(user)

    named = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        i = metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(i, int) and 0 <= i < len(tokens):
            named[name] = tokens[i]
    added = {t.content for t in raw.get_added_tokens_decoder().values()}
    missing = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(named.values()) if t not in added]
    if missing:
        raw.add_tokens(missing)

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", llama3)) and "bos_token" in named
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in named
    single = " ".join(([f"{named['bos_token']}:0"] if add_bos else []) + ["$A:0"]
                      + ([f"{named['eos_token']}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{named['bos_token']}:1"] if add_bos else []) + ["$B:1"]
                                   + ([f"{named['eos_token']}:1"] if add_eos else []))
    specials = ([(named["bos_token"], raw.token_to_id(named["bos_token"]))] if add_bos else []) + \
               ([(named["eos_token"], raw.token_to_id(named["eos_token"]))] if add_eos else [])
    raw.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return raw, named


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in keep:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling
