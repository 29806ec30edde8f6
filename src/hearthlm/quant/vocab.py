"""Tokenizer metadata for GGUF from an HF model directory (what llama.cpp's convert_hf_to_gguf.py writes)."""
from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

log = logging.getLogger("hearthlm")

# llama.cpp names its BPE pre-tokenizers by the hash of the token ids of this text (convert_hf_to_gguf.py,
# get_vocab_base_pre); a few common ones are listed here, anything else is written as "default"
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 '
              '3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def pre_tokenizer_name(tokenizer: Any) -> str:
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        log.warning("unknown BPE pre-tokenizer (hash %s); writing 'default': llama.cpp may split some text "
                    "differently from transformers", digest[:12])
    return name or "default"


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>") \
        or (token.startswith("<unused") and token.endswith(">"))


def _gpt2_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif tok in added:
            special = decoder[i].special if i in decoder else False
            tokens.append(tok)
            types.append(CONTROL if special or _looks_special(tok) else USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(NORMAL)
    return tokens, types


def write_hf_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """Add tokenizer.* keys for the tokenizer in `model_dir` (tokenizer.json) to a GGUFWriter."""
    import gguf
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no tokenizer.json: GGUF needs the vocabulary; add the tokenizer "
                             "files or quantize from a GGUF file instead")
    model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback")
    if byte_level:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        tokens, types = _gpt2_vocab(tok, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tok))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:  # SentencePiece-style (Llama 2, Gemma): llama.cpp's "llama" tokenizer with scores
        try:
            vocab = gguf.LlamaHfVocab(model_dir)
        except Exception as e:
            raise ModelLoadError(f"cannot convert the tokenizer in {model_dir} ({e})") from None
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
    special = gguf.SpecialVocab(model_dir, load_merges=byte_level, n_vocab=vocab_size)
    if special.chat_template is None and (model_dir / "chat_template.jinja").is_file():
        special.chat_template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    special.add_to_gguf(writer, quiet=True)
