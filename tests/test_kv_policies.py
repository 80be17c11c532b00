"""Attention sinks / sliding window (plugins/kv_policies) against a brute-force reference.

The reference builds the same sink + window cache from scratch, token by token, with its own
dense KV lists (``forward_dense`` over the past keys and values, float32): it keeps every
token's key as computed at the cache position it had then, and before each step rotates it
once, with its own RoPE arithmetic in float64, to the cache position it holds now. It evicts by
the documented rule (whole blocks; the first ``ceil(num_sinks / block_size)`` blocks stay; a
block leaves once all its tokens are older than the most recent ``window``). The engine's next-
token logits (seen by a recording logits processor, before any other processor) must equal the
reference's at every step, past the model's context length.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from framework import LLM, SamplingParams
from framework.errors import ConfigError
from framework.hookspecs import hookimpl
from framework.plugins import PluginManager

BS = 4


class Recorder:
    """Records each row's logits (keyed by sequence id) and leaves them unchanged."""

    rows: dict[int, list[torch.Tensor]] = {}

    def __init__(self, setup):
        Recorder.rows = {}

    def add_request(self, slot, params, request):
        pass

    def remove(self, slot):
        pass

    def apply(self, logits, ctx):
        for r, seq in enumerate(ctx.seqs):
            Recorder.rows.setdefault(seq.seq_id, []).append(logits[r].detach().clone())
        return logits


def _pm() -> PluginManager:
    plugin = types.ModuleType("recorder_plugin")
    plugin.register_logits_processors = hookimpl(lambda register: register("recorder", Recorder))
    return PluginManager(load_entry_points=False, extra_plugins=[plugin])


class SinkCacheReference:
    """Dense sink + window cache rebuilt from scratch; ``step(tokens)`` -> logits after the last."""

    def __init__(self, model, num_sinks: int, window: int, block_size: int, evict_blocks: int = 1):
        self.model, self.cfg = model, model.cfg
        self.head = -(-num_sinks // block_size) * block_size  # sink tokens kept (whole blocks)
        self.window, self.bs = window, block_size
        self.evict_blocks = evict_blocks
        d = self.cfg.head_dim
        from framework.models.llama import rope_inv_freq

        self.inv_freq = rope_inv_freq(self.cfg).double()
        assert self.inv_freq.shape == (d // 2,)
        # per retained token: (cache position its key was roped at, k and v [L, n_kv, d])
        self.kept: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def _rotate(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """RoPE rotation of keys ``[P, ..., d]`` by ``delta[P]`` positions: pairs
        (x_i, x_{i + d/2}) turn by delta * f_i."""
        a = delta.double().view(-1, *([1] * (k.dim() - 2)), 1) * self.inv_freq
        c, s = a.cos(), a.sin()
        h = k.shape[-1] // 2
        x1, x2 = k[..., :h].double(), k[..., h:].double()
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).float()

    def step(self, tokens: list[int]) -> torch.Tensor:
        P, m = len(self.kept), len(tokens)
        past = None
        mask = torch.ones(1, 1, m, P + m, dtype=torch.bool)
        mask[0, 0, :, P:] = torch.ones(m, m, dtype=torch.bool).tril()
        sw = self.cfg.sliding_window
        if sw is not None:  # the model's own window, over cache positions
            q = torch.arange(P, P + m)[:, None]
            kpos = torch.arange(P + m)[None, :]
            mask[0, 0] &= kpos > q - sw
        if P:
            delta = torch.tensor([j - pos for j, (pos, _, _) in enumerate(self.kept)])
            ks = self._rotate(torch.stack([k for _, k, _ in self.kept]), delta)  # [P, L, n_kv, d]
            vs = torch.stack([v for _, _, v in self.kept])
            past = [(ks[:, i].transpose(0, 1)[None], vs[:, i].transpose(0, 1)[None]) for i in range(ks.shape[1])]
        ids = torch.tensor([tokens])
        hidden, new = self.model.forward_dense(ids, torch.arange(P, P + m), past=past, mask=mask if P else None, return_kv=True)
        for i in range(m):
            self.kept.append((P + i, torch.stack([k[0, :, i] for k, _ in new]), torch.stack([v[0, :, i] for _, v in new])))
        self._evict()
        return self.model.compute_logits(hidden[0, -1:])[0]

    def _evict(self) -> None:
        n = len(self.kept)
        last = (n - self.window) // self.bs * self.bs  # cache positions [head, last) are all too old
        if last - self.head >= self.evict_blocks * self.bs:  # runs of >= evict_blocks blocks
            del self.kept[self.head : last]


def _reference_logits(model, prompt: list[int], output: list[int], num_sinks: int, window: int, chunk: int,
                      evict_blocks: int = 1) -> list[torch.Tensor]:
    """Logits predicting each output token: the prompt in chunks of ``chunk``, then one token at a time."""
    ref = SinkCacheReference(model, num_sinks, window, BS, evict_blocks)
    for i in range(0, len(prompt), chunk):
        logits = ref.step(prompt[i : i + chunk])
    out = [logits]
    for tok in output[:-1]:
        out.append(ref.step([tok]))
    return out


def _check(rows: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    ref = ref[len(ref) - len(rows) :]  # a fork's first token came from its parent's row
    assert len(rows) == len(ref) > 0
    err = max((a - b).abs().max().item() for a, b in zip(rows, ref))
    assert err < 1e-4, err


@torch.inference_mode()
@pytest.mark.parametrize("family,num_sinks,evict_blocks", [
    *((f, s, 1) for f in ("llama", "mistral", "qwen2", "qwen3") for s in (4, 0)), ("llama", 4, 3), ("qwen3", 0, 2)])
def test_logits_equal_a_reference_sink_cache_past_the_context(checkpoints, family, num_sinks, evict_blocks):
    window, max_len, n_out = 13, 48, 90  # generation runs ~3x past the context length
    policy = {"attention_sinks": {"num_sinks": num_sinks, "window": window, "evict_blocks": evict_blocks}}
    llm = LLM(str(checkpoints[family]), skip_tokenizer_init=True, plugin_manager=_pm(), kv_policy=policy,
              block_size=BS, max_model_len=max_len, num_kv_blocks=64, dtype="float32", device="cpu")
    prompt = [5 + (i * 7) % 300 for i in range(21)]
    params = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True, processors=[{"recorder": {}}])
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0]
    assert len(out.token_ids) == n_out and out.finish_reason == "length"
    ((seq_id, rows),) = Recorder.rows.items()
    _check(rows, _reference_logits(llm.engine.model, prompt, out.token_ids, num_sinks, window, chunk=len(prompt),
                                   evict_blocks=evict_blocks))
    bm = llm.engine.block_manager
    assert bm.check_all_free()


@torch.inference_mode()
def test_forks_and_chunked_prompts_rotate_private_copies(checkpoints):
    """n=2 forks share every block when they evict at the same step: each must rotate its own
    copy (copy-on-write). Prompt chunks of 8 tokens evict between chunks."""
    window = 10
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=_pm(),
              kv_policy={"attention_sinks": {"num_sinks": 2, "window": window}},
              block_size=BS, max_num_batched_tokens=8, num_kv_blocks=64, dtype="float32", device="cpu")
    prompt = [3 + (i * 11) % 300 for i in range(30)]
    params = SamplingParams(max_tokens=40, n=2, temperature=1.0, seed=3, ignore_eos=True, processors=[{"recorder": {}}])
    res = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    seqs = {tuple(o.token_ids) for o in res.outputs}
    assert len(seqs) == 2  # two different samples
    by_len = sorted(Recorder.rows.values(), key=len, reverse=True)
    model = llm.engine.model
    # the first sequence's rows predict every output token; match each row list to its output
    for rows in by_len:
        matched = False
        for o in res.outputs:
            ref = _reference_logits(model, prompt, o.token_ids, 2, window, chunk=8)
            tail = ref[len(ref) - len(rows) :]
            if max((a - b).abs().max().item() for a, b in zip(rows, tail)) < 1e-4:
                matched = True
        assert matched
    assert llm.engine.block_manager.check_all_free()


def test_memory_is_constant_and_options_are_validated():
    llm = LLM("demo", kv_policy={"attention_sinks": {"num_sinks": 4, "window": 28}}, block_size=BS,
              num_kv_blocks=64, dtype="float32", device="cpu", skip_tokenizer_init=True)
    eng = llm.engine
    eng.add_request("a", {"prompt_token_ids": [1, 50, 60, 70]}, SamplingParams(max_tokens=600, temperature=0, ignore_eos=True))
    held = []
    while eng.has_unfinished_requests():
        eng.step()
        held.append(eng.block_manager.num_used_blocks)
    # 1 sink block + ceil(28 / 4) window blocks + one being filled, from the start to the end
    assert max(held) <= 1 + math.ceil(28 / BS) + 1
    assert max(held[-100:]) == max(held[100:200])
    assert eng.block_manager.check_all_free()
    with pytest.raises(ConfigError, match="window"):
        LLM("demo", kv_policy={"attention_sinks": {"window": 0}}, num_kv_blocks=8, device="cpu")
    with pytest.raises(ConfigError, match="num_sink"):
        LLM("demo", kv_policy={"attention_sinks": {"num_sink": 4}}, num_kv_blocks=8, device="cpu")


@pytest.mark.parametrize("n_tokens", [pytest.param(1500, id="1500"), pytest.param(5000, id="5000", marks=pytest.mark.slow)])
@pytest.mark.parametrize("stream", [False, True], ids=["final", "streamed"])
def test_per_step_host_work_does_not_grow_with_length(text_model, stream, n_tokens):
    """A long generation (5,000 tokens under ``-m slow``, 1,500 by default (sinks + window, detokenized, stop strings watched, logprobs
    kept; ``streamed``: as a streaming request whose every partial output also goes through the
    async front end's ``RequestStream`` delta logic): per step,

    * the Python memory the step allocates (its transient peak, as tracemalloc sees it) is the
      same in the last tenth of the steps as in the first tenth (500 steps of 5,000) — an O(length) path (joining or slicing the
      whole text, copying the token or logprob list) would allocate in proportion to the length;
    * streamed: every partial output carries only the new text, tokens and logprobs (elements
      handed out per step stay bounded), and the deltas concatenate to the final output.
    """
    import tracemalloc

    from framework.request_stream import RequestStream

    llm = LLM(str(text_model), kv_policy={"attention_sinks": {"num_sinks": 4, "window": 28}}, block_size=BS,
              num_kv_blocks=64, max_model_len=64, dtype="float32", device="cpu")
    eng = llm.engine
    span = n_tokens // 10  # steps compared at each end
    params = SamplingParams(max_tokens=n_tokens, temperature=1.0, seed=0, ignore_eos=True, logprobs=1,
                            stop=["\x00never\x00"])
    eng.add_request("long", "hello world", params, stream=stream)
    rs = RequestStream("long", abort=lambda rid: None)
    peaks: list[int] = []
    touched: list[int] = []  # elements (characters + tokens + logprob entries) handed out per step
    text, tokens, lps, final = [], [], [], None
    tracemalloc.start()
    try:
        while eng.has_unfinished_requests():
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            outs = eng.step()
            deltas = [rs._delta(o) for o in outs] if stream else []
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
            for o, d in zip(outs, deltas):
                if o.finished:
                    final = o
                else:
                    assert o.delta
                    c = o.outputs[0]
                    touched.append(len(c.text) + len(c.token_ids) + len(c.logprobs))
                if d is not None and d.outputs:
                    text.append(d.outputs[0].text)
                    tokens += d.outputs[0].token_ids
                    lps += d.outputs[0].logprobs
    finally:
        tracemalloc.stop()
    assert len(peaks) >= n_tokens
    body = peaks[1:-1]  # the first step prefills, the last one builds the final output
    first, last = sum(body[:span]) / span, sum(body[-span:]) / span
    assert last <= 1.2 * first, (first, last)
    if stream:
        assert len(touched) >= n_tokens - 10 and max(touched) <= 2 + 2 * max(map(len, text)), max(touched)
        assert sum(touched[-span:]) <= 1.2 * sum(touched[:span])
        out = final.outputs[0]
        assert "".join(text) == out.text and tokens == out.token_ids and lps == out.logprobs
        assert len(out.token_ids) == n_tokens
    assert eng.block_manager.check_all_free()


@torch.inference_mode()
def test_evicted_and_rotated_blocks_leave_the_prefix_cache(checkpoints):
    """After a long sink-policy generation, a prompt made of that sequence's tokens may reuse
    only blocks whose content is still what the prefix cache says: its logits equal a fresh
    engine's."""
    kw = dict(skip_tokenizer_init=True, block_size=BS, num_kv_blocks=64, dtype="float32", device="cpu",
              kv_policy={"attention_sinks": {"num_sinks": 4, "window": 12}})
    llm = LLM(str(checkpoints["qwen2"]), **kw)
    prompt = [7 + (i * 5) % 300 for i in range(24)]
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=5)
    first = llm.generate([{"prompt_token_ids": prompt}], greedy)[0].outputs[0]
    again = prompt + first.token_ids[:16]
    reused = llm.generate([{"prompt_token_ids": again}], greedy)[0].outputs[0]
    assert llm.engine.block_manager.stats.hits > 0  # the sink blocks were shared
    fresh = LLM(str(checkpoints["qwen2"]), **kw).generate([{"prompt_token_ids": again}], greedy)[0].outputs[0]
    assert reused.token_ids == fresh.token_ids
    for a, b in zip(reused.logprobs, fresh.logprobs):
        assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) < 1e-4
