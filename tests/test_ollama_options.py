"""Ollama options: honoured, accepted as runtime-only tuning, or refused with a 400 naming options.<name> --
never silently ignored while they would change the output."""
from __future__ import annotations

import pytest

from hearthlm.errors import InvalidRequestError
from hearthlm.serve.ollama import sampling


@pytest.mark.parametrize("options", [
    {"temperature": 0, "num_predict": 8, "repeat_penalty": 1.1, "repeat_last_n": -1},
    {"num_thread": 4, "num_gpu": 99, "num_batch": 512, "use_mmap": True, "num_keep": 4},  # runtime tuning only
    {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1, "penalize_newline": False},  # their "off" values
    {"repeat_last_n": 64},  # no repetition penalty asked: nothing to window
    {"top_k": None},
])
def test_accepted(options):
    params, _ = sampling(options)
    assert params.max_tokens in (None, 8)


@pytest.mark.parametrize("options, name", [
    ({"temprature": 0}, "options.temprature"), ({"mirostat": 1}, "options.mirostat"),
    ({"typical_p": 0.5}, "options.typical_p"), ({"tfs_z": 0.9}, "options.tfs_z"),
    ({"penalize_newline": True}, "options.penalize_newline"),
    ({"repeat_penalty": 1.3, "repeat_last_n": 64}, "options.repeat_last_n"),
])
def test_refused_naming_the_option(options, name):
    with pytest.raises(InvalidRequestError) as e:
        sampling(options)
    assert e.value.param == name and name in str(e.value)


def test_options_must_be_an_object():
    with pytest.raises(InvalidRequestError) as e:
        sampling([1, 2])  # type: ignore[arg-type]
    assert e.value.param == "options"
