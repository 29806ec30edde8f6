"""Random-weight models of real shapes (no download): one HF model, shared weights with ours."""
from __future__ import annotations

from pathlib import Path

import torch

from ..loader import LoadedModel
from ..loader.hf_config import config_from_hf_dict
from ..models.registry import model_class


def build_pair(preset: str, dtype: torch.dtype, device: torch.device, vocab_size: int = 49152,
               quantization: str = "none"):
    """(hf_model, LoadedModel) sharing the same random weights; the tokenizer is the embedded model's.
    quantization: the engine's block matrices quantized at load (loader.load.weight_quantizer), or "q4_k_m":
    the layout our loader gives a Q4_K_M GGUF on the GPU (see gguf_mix_quantizer)."""
    import transformers

    from ..loader.load import weight_quantizer
    from ..plan.presets import HF_CONFIGS

    d = dict(HF_CONFIGS[preset], vocab_size=vocab_size, bos_token_id=1, eos_token_id=2)
    hf_cfg = transformers.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    state = hf.state_dict()
    cfg = config_from_hf_dict(d, name=f"{preset}-random")
    if quantization == "q4_k_m":
        quantize = gguf_mix_quantizer(cfg.num_layers)
    else:
        quantize = weight_quantizer(quantization, torch.device(device))
    net = model_class(cfg.architecture)(
        cfg, lambda n: state.get(n) if quantize is None or n not in state else quantize(n, state[n]), device)
    tok = default_or_synthetic_tokenizer()
    loaded = LoadedModel(cfg, net, tok, Path(f"{preset}-random"),
                         str(dtype).replace("torch.", "") if quantize is None else quantization, 0.0)
    return hf, loaded


def gguf_mix_quantizer(n_layers: int):
    """(name, weight) -> the weight as the loader lays out a Q4_K_M GGUF's tensors on the GPU, without writing
    and reading a multi-GB file: Q4_K (most matrices) -> 4-bit codes in groups of 32 with scale + min; Q6_K
    (lm_head; attn_v and ffn_down of llama.cpp's use_more_bits layers) -> 8-bit codes in groups of 16. The
    kernels then read the same bytes and do the same work as for the real file (values are re-quantized from
    the random bf16 weights rather than K-quant-searched)."""
    import re

    from ..layers.quant_linear import quantize_int4, quantize_int8
    from ..quant.formats import use_more_bits

    def quantize(name: str, t: torch.Tensor):
        if t.dim() != 2 or "embed_tokens" in name:
            return t
        m = re.match(r"model\.layers\.(\d+)\.", name)
        six = name.startswith("lm_head") or (m is not None and (".v_proj." in name or ".down_proj." in name)
                                             and use_more_bits(int(m.group(1)), n_layers))
        return quantize_int8(t, group=16) if six else quantize_int4(t)

    return quantize


def default_or_synthetic_tokenizer():
    """The embedded model's tokenizer (49,152 tokens) if installed, else a synthetic byte-level one."""
    from ..errors import ModelNotFoundError
    from ..loader import default_model_path
    from ..loader.gguf import GGUFWeights
    from ..loader.tokenizer import tokenizer_from_gguf

    try:
        return tokenizer_from_gguf(GGUFWeights(default_model_path()).metadata, [2])
    except ModelNotFoundError:
        return synthetic_tokenizer()


def weight_bytes(loaded: LoadedModel) -> int:
    seen, total = set(), 0
    for t in loaded.model.weight_tensors():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) / 1000)


def synthetic_tokenizer(vocab_size: int = 49152):
    """A byte-level BPE tokenizer for random-weight models where the embedded model's tokenizer is not installed:
    specials, the 256 byte tokens, then pseudo-words (" ba", " bb", ...) up to vocab_size, so that every id a
    random model samples decodes to text (streams carry one delta per token, as with a real vocabulary).
    No merges: encoding yields byte tokens only."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    from ..loader.tokenizer import Tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(vocab_size - len(vocab)):
        word, n = "", i + 26  # two letters or more
        while n:
            n, r = divmod(n, 26)
            word = letters[r] + word
        vocab["\u0120" + word] = len(vocab)  # U+0120: the byte-level form of a leading space
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(raw, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}, eos_token_ids=[2])
