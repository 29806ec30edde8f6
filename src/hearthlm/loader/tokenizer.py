"""Tokenizer + chat template, from an HF directory (tokenizer.json) or GGUF metadata."""
from __future__ import annotations

from pathlib import Path

from ..errors import InvalidRequestError, ModelLoadError


class Tokenizer:
    """Thin wrapper over a transformers fast tokenizer with the engine's needs."""

    def __init__(self, hf_tokenizer, eos_token_ids: list[int]):
        self.hf = hf_tokenizer
        ids = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids = sorted(ids)
        self.vocab_size = len(hf_tokenizer)
        self.all_special_ids = set(hf_tokenizer.all_special_ids)

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        validate_messages(messages)
        if not self.hf.chat_template:
            raise InvalidRequestError("this model has no chat template: use completion (generate) instead of chat, "
                                      "or load a model that ships one", param="messages")
        try:
            return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               tokenize=False, **kwargs)
        except Exception as e:  # jinja raises on roles a template rejects
            raise InvalidRequestError(f"the chat template rejected these messages: {e}", param="messages") from None


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


def tokenizer_from_dir(model_dir: Path, eos_token_ids: list[int]) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir} ({e}): the directory needs "
                             "tokenizer.json and tokenizer_config.json") from None
    return Tokenizer(tok, eos_token_ids)


_GGUF_TOKENIZER_KEYS = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
                        "token_type": "token_type", "merges": "merges", "bos_token_id": "bos_token_id",
                        "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id",
                        "padding_token_id": "pad_token_id", "add_space_prefix": "add_prefix_space"}


def tokenizer_from_gguf(metadata: dict, eos_token_ids: list[int]) -> Tokenizer:
    """Build the tokenizer GGUF metadata describes (transformers' GGUF converters do the vocabulary work)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tok_dict = {name: metadata[f"tokenizer.ggml.{key}"] for key, name in _GGUF_TOKENIZER_KEYS.items()
                if f"tokenizer.ggml.{key}" in metadata}
    tokens = tok_dict.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    config: dict = {"chat_template": metadata.get("tokenizer.chat_template"),
                    "add_bos_token": metadata.get("tokenizer.ggml.add_bos_token",
                                                  tok_dict.get("tokenizer_type") == "llama"),
                    "add_eos_token": metadata.get("tokenizer.ggml.add_eos_token")}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                      ("pad_token", "pad_token_id")):
        if tok_dict.get(key) is not None and 0 <= tok_dict[key] < len(tokens):
            config[name] = tokens[tok_dict[key]]
    try:
        backend, _ = convert_gguf_tokenizer(str(metadata.get("general.architecture")), tok_dict)
    except Exception as e:
        raise ModelLoadError(f"cannot build a tokenizer from the GGUF metadata ({e})") from None
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in config.items() if v is not None})
    return Tokenizer(tok, eos_token_ids)
