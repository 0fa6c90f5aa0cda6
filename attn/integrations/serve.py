"""Continuous batching of a transformers model on `attn.InflightBatch`: requests arrive and finish at any step,
and every step runs all live requests' new tokens (whole prompts of the arriving ones, one token of the others)
through the model as one packed row, with one `attn.context_attention` launch per layer over a shared paged cache.

    python -m attn.integrations.serve            # a tiny random Llama on the CPU, every request checked

How it reaches the model: the step's tokens are one sequence ``[1, T]`` with explicit ``position_ids`` (each
request's own positions), and the "cache" handed to the model is an `InflightCache`: its ``update`` writes the
step's keys and values into each layer's pool at the requests' positions and returns the pool, which the "attn"
attention function recognizes and answers with a packed causal attention of each request's rows over its own
cached tokens. Requests never see each other: the batch's ``cu_seqlens`` separate them.
"""

from __future__ import annotations

import argparse
import inspect
import time
import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import attn
from attn.inflight import CONTEXT, GENERATION, InflightBatch

from . import transformers as attn_hf


class _InflightLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache, index):
        super().__init__()
        self._cache = weakref.ref(cache)
        self.index = index
        self.k = self.v = None

    def lazy_initialization(self, key_states, value_states) -> None:
        kv = self._cache().kv
        if self.index == 0:
            self.k, self.v = kv.k, kv.v
        else:
            self.k = torch.zeros((*kv.k.shape[:2], *key_states.shape[1:2], key_states.shape[3]), dtype=kv.k.dtype,
                                 device=kv.k.device)  # fmt: skip
            self.v = torch.zeros_like(self.k)
            kv.extra_pools.append((self.k, self.v))
        attn_hf._PAGED_POOLS[id(self.k)] = self
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch = self._cache().batch
        # [1, Hkv, T, D] -> packed [T, Hkv, D], written at each request's past length
        k_new, v_new = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)
        attn.append_kv(self.k, self.v, k_new, v_new, batch.cache_seqlens_before, cu_seqlens_new=batch.cu_seqlens_new,
                       block_table=batch.block_table)  # fmt: skip
        return self.k, self.v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def attend(self, module, query, mask, *, causal, scale, window, softcap, alibi_slopes=None, rel_bias=None):
        if mask is not None or not causal:
            raise NotImplementedError("InflightCache: the step is one packed row with no padding mask, causal only")
        batch = self._cache().batch
        q = query[0].transpose(0, 1)  # [T, Hq, D]
        out = attn.context_attention(
            q, self.k, self.v, batch.cache_seqlens_after, cu_seqlens_q=batch.cu_seqlens_new,
            max_seqlen_q=batch.max_new, block_table=batch.block_table, causal=True, softmax_scale=scale,
            window_size=window, softcap=softcap, alibi_slopes=alibi_slopes, rel_bias=rel_bias,
        )  # fmt: skip
        return out[None]


class InflightCache(Cache):
    """A transformers ``Cache`` over one `attn.PagedKVCache` per model (layer 0's pools; the other layers' in its
    ``extra_pools``), for packed inflight steps: set `batch` before each forward."""

    def __init__(self, config, kv: attn.PagedKVCache):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.kv = kv
        self.batch: InflightBatch | None = None
        super().__init__(layers=[_InflightLayer(self, i) for i in range(text.num_hidden_layers)])


@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new: int
    arrival: int
    slot: int = -1
    output: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new


class Server:
    """Greedy continuous batching: each step admits arriving requests while slots and blocks last, runs every
    live request's new tokens in one forward, and retires finished requests (their blocks go back)."""

    def __init__(self, model, *, num_blocks=64, block_size=16, max_seqs=8, max_blocks_per_seq=16):
        attn_hf.register()
        model.set_attn_implementation("attn")
        cfg = model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        self.model = model
        self.kv = attn.PagedKVCache(
            num_blocks=num_blocks, block_size=block_size, num_heads_kv=cfg.num_key_value_heads, head_dim=head_dim,
            max_seqs=max_seqs, max_blocks_per_seq=max_blocks_per_seq, dtype=param.dtype, device=param.device,
        )  # fmt: skip
        self.cache = InflightCache(model.config, self.kv)
        # transformers 5 renamed the forward's past_key_values to cache
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.device = param.device

    def lifetime_blocks(self, r: Request) -> int:
        return -(-(len(r.prompt) + r.max_new) // self.kv.block_size)

    def can_admit(self, r: Request, running: list[Request]) -> bool:
        """A slot is free and the blocks of every running request's whole life, and of this one's, fit: admitted
        requests never run out of blocks mid-generation (no preemption here)."""
        need = self.lifetime_blocks(r)
        reserved = sum(self.lifetime_blocks(x) for x in running)
        return (len(self.kv.live) < self.kv.max_seqs and need <= self.kv.max_blocks_per_seq
                and reserved + need <= self.kv.allocator.num_blocks)  # fmt: skip

    @torch.no_grad()
    def step(self, running: list[Request]) -> None:
        types, new, past, tokens, positions = [], [], [], [], []
        for r in running:
            past_len = self.kv.length(r.slot)
            fresh = r.prompt if past_len == 0 else r.output[-1:]
            types.append(CONTEXT if past_len == 0 else GENERATION)
            new.append(len(fresh))
            past.append(past_len)
            tokens += fresh
            positions += range(past_len, past_len + len(fresh))
        slots = [r.slot for r in running]
        self.kv.reserve_tokens(slots, new)
        batch = InflightBatch.build(types, new, past, block_table=self.kv.block_table[slots], device=self.device)
        self.cache.batch = batch
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        kw = {self.cache_arg: self.cache}
        logits = self.model(input_ids=ids, position_ids=pos, use_cache=True, **kw).logits[0]
        self.kv.advance(slots, new)
        last = (batch.cu_seqlens_new[1:] - 1).long()
        for r, tok in zip(running, logits[last].argmax(-1).tolist()):
            r.output.append(tok)

    def serve(self, requests: list[Request], log=print) -> dict:
        pending = sorted(requests, key=lambda r: r.arrival)
        running: list[Request] = []
        finished: list[Request] = []
        step, tokens, start = 0, 0, time.perf_counter()
        while pending or running:
            while pending and pending[0].arrival <= step and self.can_admit(pending[0], running):
                r = pending.pop(0)
                r.slot = self.kv.add_sequence()
                running.append(r)
            if running:
                self.step(running)
                tokens += len(running)
            for r in [r for r in running if r.done]:
                running.remove(r)
                self.kv.release(r.slot)
                finished.append(r)
            if log:
                log(f"step {step:3d}: {len(running)} running, {len(pending)} waiting, {len(finished)} done, "
                    f"{self.kv.allocator.num_used} blocks in use")  # fmt: skip
            step += 1
        return {"steps": step, "generated_tokens": tokens, "seconds": time.perf_counter() - start}


def make_requests(n, vocab, seed=0, prompt_range=(3, 12), output_range=(4, 10), arrival_every=2) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=g))
        olen = int(torch.randint(output_range[0], output_range[1] + 1, (1,), generator=g))
        prompt = torch.randint(2, vocab, (plen,), generator=g).tolist()
        out.append(Request(rid=i, prompt=prompt, max_new=olen, arrival=i * arrival_every))
    return out


def check_against_generate(model, requests: list[Request]) -> int:
    """Each request's tokens against transformers' own greedy ``generate`` of it alone with eager attention;
    returns the number of mismatching requests."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    bad = 0
    with torch.no_grad():
        for r in requests:
            ids = torch.tensor([r.prompt], device=next(model.parameters()).device)
            want = model.generate(ids, max_new_tokens=r.max_new, do_sample=False, pad_token_id=0, eos_token_id=None)
            bad += want[0, len(r.prompt) :].tolist() != r.output
    model.set_attn_implementation(impl)
    return bad


def tiny_llama(device="cpu", dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    model = tiny_llama(args.device)
    requests = make_requests(args.requests, model.config.vocab_size)
    server = Server(model, num_blocks=32, block_size=4, max_seqs=4, max_blocks_per_seq=8)
    stats = server.serve(requests, log=None if args.quiet else print)
    stats["mismatched_requests"] = check_against_generate(model, requests)
    print(stats)
    return stats


if __name__ == "__main__":
    main()
