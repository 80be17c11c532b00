"""The names people bring from vLLM and Hugging Face: ``import decodekit``,
``generate(prompts, sampling_params=...)``, ``LLM.chat``, and did-you-mean errors that point at
decodekit's name for a foreign one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from framework.errors import ConfigError, InvalidRequestError


def test_import_decodekit_is_light_and_complete():
    code = ("import sys, decodekit; assert 'torch' not in sys.modules; "
            "from decodekit import LLM, SamplingParams, load_pipeline, InvalidRequestError, EngineConfig; "
            "import framework; assert LLM is framework.LLM and sorted(decodekit.__all__) == sorted(framework.__all__); "
            "print(decodekit.__version__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    import framework

    assert res.stdout.strip() == framework.__version__


@pytest.fixture(scope="module")
def llm():
    from decodekit import LLM

    return LLM("demo", kv_cache_memory="32MiB")


def test_generate_takes_sampling_params_by_name_and_chat_renders(llm):
    from decodekit import SamplingParams

    p = SamplingParams(max_tokens=6, temperature=0)
    by_name = llm.generate(["Once upon a time"], sampling_params=p)[0].outputs[0].token_ids
    assert by_name == llm.generate("Once upon a time", p)[0].outputs[0].token_ids
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    out = llm.chat(messages, sampling_params=p)
    from framework.chat import render_chat

    text = render_chat(llm.tokenizer, messages)
    assert len(out) == 1 and out[0].prompt == text
    assert out[0].outputs[0].token_ids == llm.generate(text, p)[0].outputs[0].token_ids
    assert len(llm.chat([messages, messages + [{"role": "assistant", "content": "Waves."}]], p)) == 2


def test_stream_refuses_several_samples(llm):
    from decodekit import SamplingParams

    with pytest.raises(InvalidRequestError, match="one completion"):
        list(llm.stream("Hi", SamplingParams(n=2, max_tokens=3)))


@pytest.mark.parametrize("kwargs,hint", [
    ({"max_new_tokens": 5}, "decodekit calls it 'max_tokens'"),
    ({"do_sample": True}, "decodekit calls it 'temperature'"),
    ({"temprature": 0.5}, "did you mean 'temperature'?"),
    ({"stop_sequences": ["x"]}, "decodekit calls it 'stop'"),
])
def test_sampling_params_foreign_names(kwargs, hint):
    from decodekit import SamplingParams

    with pytest.raises(InvalidRequestError, match=hint):
        SamplingParams(**kwargs)


def test_engine_foreign_names():
    from decodekit import LLM

    with pytest.raises(ConfigError, match="gpu_memory_utilization: unknown field; decodekit calls it 'kv_cache_memory'"):
        LLM("demo", gpu_memory_utilization=0.9)
    with pytest.raises(ConfigError, match="did you mean 'max_num_seqs'"):
        LLM("demo", max_num_seq=4)
