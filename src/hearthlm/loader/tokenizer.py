"""Tokenizer + chat template, from an HF directory (tokenizer.json) or GGUF metadata.

Built on the Rust `tokenizers` library and jinja2 (chat_template.py): importing transformers costs seconds of cold
start, so the load path never does. Behaviour follows transformers' fast tokenizers (special tokens from
tokenizer_config.json, decode, chat template rendering). transformers remains a fallback only for what is not
reproduced here: GGUF vocabularies other than byte-level BPE with a known pre-tokenizer (gguf_tokenizer.py), and
model directories without a tokenizer.json."""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, ModelLoadError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class Tokenizer:
    """Encode / decode / chat template over a `tokenizers.Tokenizer` (`backend`).

    special_tokens: name -> token text (bos_token, eos_token, ..., and model-specific *_token names); with
    extra_special_tokens they make all_special_ids and are passed to the chat template, as in transformers.
    chat_template: one template, or {name: template} ("default", "tool_use", ...)."""

    def __init__(self, backend, special_tokens: dict[str, str] | None = None, extra_special_tokens: Iterable[str] = (),
                 chat_template: str | dict[str, str] | None = None, eos_token_ids: Iterable[int] = (),
                 clean_up_tokenization_spaces: bool = False):
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.special_tokens = {k: str(v) for k, v in (special_tokens or {}).items() if v is not None}
        self.extra_special_tokens = [str(t) for t in dict.fromkeys(extra_special_tokens)]
        self.chat_templates = {"default": chat_template} if isinstance(chat_template, str) else \
            {k: v for k, v in (chat_template or {}).items() if isinstance(v, str)}
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self.token_to_id(self.special_tokens.get("eos_token"))
        ids = set(eos_token_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        self.eos_token_ids = sorted(ids)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        unk = self.token_to_id(self.special_tokens.get("unk_token"))
        special = [self.token_to_id(t) for t in [*self.special_tokens.values(), *self.extra_special_tokens]]
        self.all_special_ids = {unk if i is None else i for i in special} - {None}

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(ids if isinstance(ids, list) else [int(i) for i in ids],
                                   skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str | None] | None:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, even when they are not valid UTF-8 alone (decode would give U+FFFD):
        byte-level BPE maps the vocabulary string back through GPT-2's byte alphabet, a SentencePiece byte token
        <0xNN> is that byte, an added token is its text. Anything else is its decoded text in UTF-8."""
        piece = self.backend.id_to_token(int(token_id))
        if piece is None or int(token_id) in self._added_ids:
            return self.decode([int(token_id)], skip_special_tokens=False).encode("utf-8")
        kind, inverse = self._piece_decoding
        if kind == "byte_level" and all(c in inverse for c in piece):
            return bytes(inverse[c] for c in piece)
        if kind == "byte_fallback" and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return self.decode([int(token_id)], skip_special_tokens=False).encode("utf-8")

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self.backend.get_added_tokens_decoder())

    @functools.cached_property
    def _piece_decoding(self) -> tuple[str, dict[str, int]]:
        """("byte_level", char -> byte) when the decoder is GPT-2's ByteLevel, ("byte_fallback", {}) when it turns
        <0xNN> pieces into bytes (SentencePiece), else ("text", {})."""
        from .gguf_tokenizer import byte_alphabet

        decoder = self.backend.decoder
        try:
            spec = json.dumps(json.loads(decoder.__getstate__())) if decoder is not None else ""
        except Exception:  # noqa: BLE001 - an unknown decoder: fall back to decoded text
            spec = type(decoder).__name__
        if '"ByteLevel"' in spec or spec == "ByteLevel":
            return "byte_level", {c: b for b, c in byte_alphabet().items()}
        if '"ByteFallback"' in spec or spec == "ByteFallback":
            return "byte_fallback", {}
        return "text", {}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        from .chat_template import render_chat

        validate_messages(messages)
        templates = self.chat_templates
        template = templates.get("tool_use") if kwargs.get("tools") is not None else None
        template = template or templates.get("default")
        if not template:
            if templates:
                raise InvalidRequestError(f"this model has several chat templates ({', '.join(sorted(templates))}) "
                                          "and none is the default: use completion (generate) instead of chat",
                                          param="messages")
            raise InvalidRequestError("this model has no chat template: use completion (generate) instead of chat, "
                                      "or load a model that ships one", param="messages")
        try:
            return render_chat(template, messages, add_generation_prompt, self.special_tokens, **kwargs)
        except Exception as e:  # noqa: BLE001 - jinja raises on roles a template rejects
            raise InvalidRequestError(f"the chat template rejected these messages: {e}", param="messages") from None

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (with the chat template) that this module and
        transformers' AutoTokenizer both load back to the same tokenizer."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        added = {str(i): {f: getattr(t, f) for f in _ADDED_TOKEN_FIELDS}
                 for i, t in sorted(self.backend.get_added_tokens_decoder().items())}
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
                                  **self.special_tokens,
                                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        if self.extra_special_tokens:
            config["additional_special_tokens"] = self.extra_special_tokens
        if list(self.chat_templates) == ["default"]:
            config["chat_template"] = self.chat_templates["default"]
        elif self.chat_templates:
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_templates.items()]
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization_spaces (spaces before punctuation and contractions)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


VALID_ROLES = {"system", "user", "assistant", "tool", "developer"}


def validate_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        if m["role"] not in VALID_ROLES:
            raise InvalidRequestError(f"messages[{i}].role {m['role']!r} is not one of {sorted(VALID_ROLES)}",
                                      param="messages")
        if not isinstance(m.get("content", ""), str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", param="messages")


# --- HF model directory ---------------------------------------------------------------------------------------------

def tokenizer_from_dir(model_dir: Path, eos_token_ids: list[int]) -> Tokenizer:
    """tokenizer.json as shipped, special tokens and chat template(s) from tokenizer_config.json /
    chat_template.jinja / additional_chat_templates/, the way transformers' AutoTokenizer reads them."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        return _dir_via_transformers(model_dir, eos_token_ids)
    from tokenizers import Tokenizer as RawTokenizer

    try:
        backend = RawTokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg = _read_json(model_dir / "tokenizer_config.json")
        legacy = {} if "added_tokens_decoder" in cfg else _read_json(model_dir / "special_tokens_map.json")
        named, extras = _add_config_tokens(backend, cfg, legacy)
        templates = _dir_chat_templates(model_dir, cfg)
    except Exception as e:  # noqa: BLE001 - any failure becomes one actionable error
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir} ({e}): the directory needs "
                             "tokenizer.json and tokenizer_config.json") from None
    backend.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
    clean = bool(cfg.get("clean_up_tokenization_spaces", False))
    if clean and type(backend.model).__name__ == "BPE":  # transformers skips it for BPE: it would corrupt text
        clean = bool(cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
    return Tokenizer(backend, named, extras, templates, eos_token_ids, clean)


def _add_config_tokens(backend, cfg: dict, legacy: dict) -> tuple[dict[str, str], list[str]]:
    """The named special tokens ({name: text}) and extra special tokens of tokenizer_config.json (legacy:
    special_tokens_map.json). As transformers does, the config's added tokens that tokenizer.json lacks (or
    flags differently) are added to the backend, then the special tokens not yet in it."""
    from tokenizers import AddedToken

    def added_token(value) -> AddedToken | str | None:  # "<s>" or {"content": "<s>", "lstrip": false, ...}
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            return AddedToken(**{k: v for k, v in value.items() if k in _ADDED_TOKEN_FIELDS})
        return value if isinstance(value, str) else None

    def text(t: AddedToken | str) -> str:
        return t if isinstance(t, str) else t.content

    decoder_cfg = {int(i): added_token(t) for i, t in (cfg.get("added_tokens_decoder") or {}).items()}
    by_content = {t.content: t for t in decoder_cfg.values() if isinstance(t, AddedToken)}
    named: dict[str, AddedToken | str] = {}
    for key in SPECIAL_NAMES:
        value = added_token(cfg[key] if key in cfg else legacy.get(key))
        if value is not None:
            named[key] = by_content.get(value, value) if isinstance(value, str) else value
    for key, value in cfg.items():  # model-specific names (image_token, ...) are special tokens too (transformers v5)
        if key.endswith("_token") and key not in SPECIAL_NAMES and isinstance(value, str):
            named[key] = by_content.get(value, value)
    extra_cfg = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") \
        or legacy.get("extra_special_tokens") or legacy.get("additional_special_tokens") or []
    if isinstance(extra_cfg, dict):  # {name: token}: named ones
        named.update({k: v for k, v in ((k, added_token(v)) for k, v in extra_cfg.items()) if v is not None})
        extra_cfg = []
    extras = [t for t in map(added_token, extra_cfg) if t is not None]

    present = backend.get_added_tokens_decoder().values()
    reprs = {repr(t) for t in present}
    to_add = [t for _, t in sorted(decoder_cfg.items()) if isinstance(t, AddedToken) and repr(t) not in reprs]
    known = {t.content for t in present} | {t.content for t in to_add}
    for value in [*named.values(), *extras]:
        if text(value) not in known:
            to_add.append(value)
            known.add(text(value))
    named_text = {text(v) for v in named.values()}
    tokens = []
    for t in to_add:
        if isinstance(t, str):
            t = AddedToken(t, special=True)
        elif not t.special and t.content in named_text:
            t.special = True
        tokens.append(t)
    if tokens:
        backend.add_tokens(tokens)
    return {k: text(v) for k, v in named.items()}, [text(t) for t in extras]


def _dir_chat_templates(model_dir: Path, cfg: dict) -> dict[str, str]:
    """chat_template.jinja and additional_chat_templates/*.jinja take priority over tokenizer_config.json's
    chat_template (a string, or a list of {name, template})."""
    templates = {}
    if (model_dir / "chat_template.jinja").is_file():
        templates["default"] = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if templates:
        return templates
    value = cfg.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(v, str)}
    return {}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _dir_via_transformers(model_dir: Path, eos_token_ids: list[int]) -> Tokenizer:
    """No tokenizer.json (SentencePiece tokenizer.model, vocab.json + merges.txt): transformers converts it."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - any failure becomes one actionable error
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir} ({e}): the directory needs "
                             "tokenizer.json and tokenizer_config.json") from None
    return from_transformers(tok, eos_token_ids)


def from_transformers(hf_tokenizer, eos_token_ids: Iterable[int] = (), chat_template=None) -> Tokenizer:
    """Our Tokenizer over a transformers fast tokenizer's backend (fallback paths); chat_template overrides the
    tokenizer's own."""
    named = {k: v for k, v in hf_tokenizer.special_tokens_map.items() if isinstance(v, str)}
    extras = getattr(hf_tokenizer, "extra_special_tokens", None) or \
        getattr(hf_tokenizer, "additional_special_tokens", None) or []
    clean = bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)) and (
        type(hf_tokenizer.backend_tokenizer.model).__name__ != "BPE"
        or getattr(hf_tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
    return Tokenizer(hf_tokenizer.backend_tokenizer, named, [str(t) for t in extras],
                     chat_template or hf_tokenizer.chat_template, eos_token_ids, clean)


# --- GGUF metadata ----------------------------------------------------------------------------------------------

def tokenizer_from_gguf(metadata: dict, eos_token_ids: list[int]) -> Tokenizer:
    """Build the tokenizer GGUF metadata describes: byte-level BPE here (gguf_tokenizer.py), anything else
    through transformers' GGUF converters."""
    from .gguf_tokenizer import byte_level_bpe

    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    try:
        built = byte_level_bpe(metadata)
    except Exception as e:  # noqa: BLE001 - any failure becomes one actionable error
        raise ModelLoadError(f"cannot build a tokenizer from the GGUF metadata ({e})") from None
    if built is None:
        return _gguf_via_transformers(metadata, eos_token_ids)
    backend, named = built
    return Tokenizer(backend, named, chat_template=_gguf_chat_templates(metadata), eos_token_ids=eos_token_ids)


def _gguf_chat_templates(metadata: dict) -> dict[str, str]:
    """tokenizer.chat_template, plus named ones (tokenizer.chat_template.<name>, e.g. tool_use)."""
    templates = {}
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        templates["default"] = metadata["tokenizer.chat_template"]
    for key, value in metadata.items():
        if key.startswith("tokenizer.chat_template.") and isinstance(value, str):
            templates[key.removeprefix("tokenizer.chat_template.")] = value
    return templates


_GGUF_TOKENIZER_KEYS = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
                        "token_type": "token_type", "merges": "merges", "bos_token_id": "bos_token_id",
                        "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id",
                        "padding_token_id": "pad_token_id", "add_space_prefix": "add_prefix_space"}


def _gguf_via_transformers(metadata: dict, eos_token_ids: list[int]) -> Tokenizer:
    """SentencePiece ("llama"), unigram ("t5"), unknown BPE pre-tokenizers: transformers' GGUF converters."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
    )

    tok_dict = {name: metadata[f"tokenizer.ggml.{key}"] for key, name in _GGUF_TOKENIZER_KEYS.items()
                if f"tokenizer.ggml.{key}" in metadata}
    tokens = tok_dict["tokens"]
    config: dict = {"add_bos_token": metadata.get("tokenizer.ggml.add_bos_token",
                                                  tok_dict.get("tokenizer_type") == "llama"),
                    "add_eos_token": metadata.get("tokenizer.ggml.add_eos_token")}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                      ("pad_token", "pad_token_id")):
        if tok_dict.get(key) is not None and 0 <= tok_dict[key] < len(tokens):
            config[name] = tokens[tok_dict[key]]
    try:
        backend, _ = convert_gguf_tokenizer(str(metadata.get("general.architecture")), tok_dict)
    except Exception as e:  # noqa: BLE001 - any failure becomes one actionable error
        raise ModelLoadError(f"cannot build a tokenizer from the GGUF metadata ({e})") from None
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in config.items() if v is not None})
    return from_transformers(tok, eos_token_ids, _gguf_chat_templates(metadata))
