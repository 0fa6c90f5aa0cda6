"""End-to-end demo, encoder-decoder: a tiny T5-style model served with continuous batching, its attention all `attn`.

    python -m attn.demo_encdec                # a tiny model, a handful of requests (on a CPU: Triton's interpreter)
    python -m attn.demo_encdec --large        # on a GPU: a bigger model and a longer stream of requests

Each request brings a source text for the encoder and a short decoder prompt (a forced prefix, like Whisper's
task tokens), then generates. The serving loop, the admission rule and the per-step schedule are
`attn.demo`'s; what this demo adds is the encoder and the cross cache:

- On admission a request's source runs through the encoder: bidirectional self-attention with T5's relative
  bias (bidirectional buckets), one `attn.attention` call per layer over the packed sources of every request
  admitted at that step. Its output is projected once per decoder layer into cross keys and values, written with
  `attn.append_kv` into a paged cross cache: a second `attn.PagedKVCache` (its own pool, block table and
  slots), because the cross cache's size is known at admission and never grows, while the self-attention
  cache grows a token at a time.
- Every decoder layer runs causal self-attention with T5's relative bias (unidirectional buckets, no RoPE, no
  ``1/sqrt(D)``) as one `attn.gpt_attention` call over the paged self-attention cache, for the step's whole
  mix of prompt chunks and generation tokens; then `attn.cross_attention` of the same rows over each row's
  request's encoder keys and values, with ``encoder_lengths``: one call for the prompt chunks' rows, packed
  (the context kernel), one for the generation rows as one-token queries (the split-K decode kernel).
- A finished request gives back its self-attention blocks and its cross blocks.

Simplifications: the encoder pass runs at the start of the step after admission, outside the step's token
budget (a real server would budget it too, or run it on its own stream); no preemption, as in `attn.demo`.

Every sampled token's logits are checked against a naive float32 recompute without any cache: the encoder over
the source and the decoder over the whole sequence so far, with plain PyTorch attention (the T5 bias built by
`attn.reference.relative_bias_matrix`, causal mask by ``torch.tril``). The run raises on a mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import attn
from attn.demo import Request, Server, arg_parser, make_requests, plot_over_time, relative_error, serve
from attn.inflight import CONTEXT, GENERATION
from attn.kv_cache import PagedKVCache
from attn.layout import cu_seqlens_from_lengths
from attn.reference.relative_bias import RelativeBias, relative_bias_matrix


@dataclass(frozen=True)
class EncDecConfig:
    """``layers`` is the decoder's depth (what `attn.demo.Server` sizes its self-attention pools by)."""

    vocab: int
    enc_layers: int
    layers: int
    heads_q: int
    heads_kv: int
    head_dim: int
    mlp: int
    num_buckets: int
    max_distance: int

    @property
    def width(self) -> int:
        return self.heads_q * self.head_dim


class TinyT5:
    """T5-style encoder-decoder with random weights.

    T5's choices: pre-norm blocks (RMSNorm, here without a gain), no biases, no position embeddings but one
    relative bias table per stack shared by its layers, no ``1/sqrt(D)`` on the scores (T5 folds it into the
    query weights' initialization, and so do we), a ReLU MLP, one embedding for both stacks. Not T5's: GQA.
    """

    def __init__(self, cfg: EncDecConfig, device, dtype, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.cfg, self.device, self.dtype = cfg, device, dtype
        w, d = cfg.width, cfg.head_dim
        kv = cfg.heads_kv * d

        def param(*shape, scale):
            return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

        def qkv():
            # the query columns carry the 1/sqrt(D) that the attention leaves out
            return torch.cat([param(w, w, scale=1 / math.sqrt(w * d)), param(w, 2 * kv, scale=1 / math.sqrt(w))], 1)

        def mlp():
            return {
                "up": param(w, cfg.mlp, scale=1 / math.sqrt(w)),
                "down": param(cfg.mlp, w, scale=1 / math.sqrt(cfg.mlp)),
            }

        self.embed = param(cfg.vocab, w, scale=1.0)
        self.enc_table = param(cfg.heads_q, cfg.num_buckets, scale=0.5)
        self.dec_table = param(cfg.heads_q, cfg.num_buckets, scale=0.5)
        self.encoder = [
            {"qkv": qkv(), "out": param(w, w, scale=1 / math.sqrt(w)), **mlp()} for _ in range(cfg.enc_layers)
        ]
        self.decoder = [
            {
                "qkv": qkv(),
                "out": param(w, w, scale=1 / math.sqrt(w)),
                "cross_q": param(w, w, scale=1 / math.sqrt(w * d)),
                "cross_kv": param(w, 2 * kv, scale=1 / math.sqrt(w)),
                "cross_out": param(w, w, scale=1 / math.sqrt(w)),
                **mlp(),
            }
            for _ in range(cfg.layers)
        ]
        self.head = param(w, cfg.vocab, scale=1 / math.sqrt(w))

    def rel_bias(self, *, encoder: bool) -> RelativeBias:
        """The stack's T5 bias in implicit mode: bidirectional buckets for the encoder, past-only for the decoder."""
        table = self.enc_table if encoder else self.dec_table
        return RelativeBias(table=table, max_distance=self.cfg.max_distance, bidirectional=encoder)

    @staticmethod
    def _norm(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    def split_heads(self, qkv):
        """``qkv [T, (Hq+2Hkv)·D]`` as views ``q [T, Hq, D]``, ``k, v [T, Hkv, D]``."""
        cfg = self.cfg
        heads = qkv.view(qkv.shape[0], cfg.heads_q + 2 * cfg.heads_kv, cfg.head_dim)
        return heads.split([cfg.heads_q, cfg.heads_kv, cfg.heads_kv], dim=1)

    def encode(self, tokens, attend):
        """The encoder's output ``[T, W]`` for packed source ``tokens [T]``; ``attend(layer, qkv)`` returns
        ``[T, Hq, D]``."""
        x = self.embed[tokens]
        for i, blk in enumerate(self.encoder):
            x = x + attend(i, self._norm(x) @ blk["qkv"]).reshape(x.shape[0], -1) @ blk["out"]
            x = x + torch.relu(self._norm(x) @ blk["up"]) @ blk["down"]
        return self._norm(x)

    def cross_kv(self, layer: int, enc_out):
        """Decoder layer ``layer``'s cross keys and values of an encoder output ``[T, W]``: ``[T, Hkv, D]`` each."""
        cfg = self.cfg
        kv = (enc_out @ self.decoder[layer]["cross_kv"]).view(enc_out.shape[0], 2 * cfg.heads_kv, cfg.head_dim)
        return kv[:, : cfg.heads_kv], kv[:, cfg.heads_kv :]

    def decode(self, tokens, self_attend, cross_attend):
        """Logits ``[T, vocab]`` for decoder ``tokens [T]``; ``self_attend(layer, qkv)`` and
        ``cross_attend(layer, q [T, Hq, D])`` return ``[T, Hq, D]``."""
        cfg = self.cfg
        x = self.embed[tokens]
        for i, blk in enumerate(self.decoder):
            x = x + self_attend(i, self._norm(x) @ blk["qkv"]).reshape(x.shape[0], -1) @ blk["out"]
            q = (self._norm(x) @ blk["cross_q"]).view(x.shape[0], cfg.heads_q, cfg.head_dim)
            x = x + cross_attend(i, q).reshape(x.shape[0], -1) @ blk["cross_out"]
            x = x + torch.relu(self._norm(x) @ blk["up"]) @ blk["down"]
        return self._norm(x) @ self.head

    def as_float32(self) -> TinyT5:
        """The same weights (as this model rounded them) in float32, for the naive recompute."""
        twin = object.__new__(TinyT5)
        twin.cfg, twin.device, twin.dtype = self.cfg, self.device, torch.float32
        twin.embed, twin.head = self.embed.float(), self.head.float()
        twin.enc_table, twin.dec_table = self.enc_table.float(), self.dec_table.float()
        twin.encoder = [{key: w.float() for key, w in blk.items()} for blk in self.encoder]
        twin.decoder = [{key: w.float() for key, w in blk.items()} for blk in self.decoder]
        return twin

    def naive_logits(self, source, tokens):
        """The model over one request, with no cache of any kind: the encoder over ``source [S]``, the decoder
        over ``tokens [L]`` (call it on `as_float32`'s twin). The reference for every served step."""
        s, n = len(source), len(tokens)
        enc_bias = relative_bias_matrix(self.rel_bias(encoder=True), s, s)  # [Hq, S, S]
        dec_bias = relative_bias_matrix(self.rel_bias(encoder=False), n, n)  # [Hq, L, L]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        enc = self.encode(source, lambda i, qkv: naive_attention(*self.split_heads(qkv), bias=enc_bias))
        cross = [self.cross_kv(i, enc) for i in range(self.cfg.layers)]
        return self.decode(
            tokens,
            lambda i, qkv: naive_attention(*self.split_heads(qkv), bias=dec_bias, mask=causal),
            lambda i, q: naive_attention(q, *cross[i]),
        )


def naive_attention(q, k, v, *, bias=None, mask=None):
    """Plain softmax attention of one sequence, T5's scale of 1: ``q [Sq, Hq, D]``, ``k, v [Sk, Hkv, D]``,
    ``bias [Hq, Sq, Sk]`` added to the scores, ``mask [Sq, Sk]`` (True = visible). Returns ``[Sq, Hq, D]``."""
    group = q.shape[1] // k.shape[1]
    # GQA: query head h reads KV head h // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@dataclass
class EncDecRequest(Request):
    source: list[int] = field(default_factory=list)
    cross_slot: int | None = None


class EncDecServer(Server):
    """`attn.demo.Server` with an encoder pass at admission and a paged cross cache beside the self-attention one.

    The cross cache is a second `PagedKVCache`: one block table for all decoder layers (its own pools for layer
    0, ``extra_pools`` for the others), filled once per request and released with it.
    """

    def __init__(self, model: TinyT5, *, cross_blocks, cross_blocks_per_seq, **kwargs):
        super().__init__(model, **kwargs)
        cfg = model.cfg
        self.cross = PagedKVCache(num_blocks=cross_blocks, block_size=self.cache.block_size, num_heads_kv=cfg.heads_kv,
                                  head_dim=cfg.head_dim, max_seqs=self.cache.max_seqs,
                                  max_blocks_per_seq=cross_blocks_per_seq, dtype=model.dtype,
                                  device=model.device)  # fmt: skip
        self.cross.extra_pools = [(torch.zeros_like(self.cross.k), torch.zeros_like(self.cross.v))
                                  for _ in range(cfg.layers - 1)]  # fmt: skip
        self.cross_pools = [(self.cross.k, self.cross.v), *self.cross.extra_pools]
        self.to_encode: list[EncDecRequest] = []
        self.attention_parts = {"encoder": 0.0, "self": 0.0, "cross": 0.0}
        self.stats = {"encoder_passes": 0, "encoder_batch_max": 0, "mixed_steps": 0, "chunks": 0, "cross_waits": 0}

    def cross_blocks(self, r: EncDecRequest) -> int:
        return -(-len(r.source) // self.cross.block_size)

    def can_admit(self, r: EncDecRequest) -> bool:
        if not super().can_admit(r):
            return False
        # the cross blocks are taken at admission, all at once, so the free count is the whole test for them
        if self.cross_blocks(r) > self.cross.allocator.num_free:
            self.stats["cross_waits"] += 1
            return False
        return True

    def admit(self, r: EncDecRequest) -> None:
        super().admit(r)
        r.cross_slot = self.cross.add_sequence()
        self.cross.reserve_tokens([r.cross_slot], [len(r.source)])
        self.to_encode.append(r)

    def finish(self, r: EncDecRequest) -> None:
        super().finish(r)
        self.cross.release(r.cross_slot)

    def usage(self) -> dict[str, tuple[int, int]]:
        return {**super().usage(), "cross blocks": (self.cross.allocator.num_used, self.cross.allocator.num_blocks)}

    def _timed(self, part, fn, *args, **kwargs):
        before = self.attention_s
        out = self.timed(fn, *args, **kwargs)
        self.attention_parts[part] += self.attention_s - before
        return out

    def encode_admitted(self) -> None:
        """Runs the encoder over the sources of every request admitted since the last step, packed, and writes
        each decoder layer's cross keys and values into the cross cache."""
        reqs, self.to_encode = self.to_encode, []
        if not reqs:
            return
        model, device = self.model, self.model.device
        lens = [len(r.source) for r in reqs]
        tokens = torch.tensor([t for r in reqs for t in r.source], device=device)
        cu = cu_seqlens_from_lengths(torch.tensor(lens, dtype=torch.int32, device=device))
        rel = model.rel_bias(encoder=True)

        def attend(i, qkv):
            q, k, v = model.split_heads(qkv)
            return self._timed("encoder", attn.attention, q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                               max_seqlen_q=max(lens), max_seqlen_k=max(lens), causal=False, rel_bias=rel,
                               softmax_scale=1.0)  # fmt: skip

        enc = model.encode(tokens, attend)
        slots = [r.cross_slot for r in reqs]
        # the cross slots were reserved at admission and hold nothing yet: an append into empty caches
        empty, table = self.cross.metadata(slots)
        for i, (k_pool, v_pool) in enumerate(self.cross_pools):
            k, v = model.cross_kv(i, enc)
            attn.append_kv(k_pool, v_pool, k, v, empty, cu_seqlens_new=cu, block_table=table)
        self.cross.advance(slots, lens)
        self.stats["encoder_passes"] += 1
        self.stats["encoder_batch_max"] = max(self.stats["encoder_batch_max"], len(reqs))

    def schedule(self, running):
        chunks, types, counts = super().schedule(running)
        self.stats["mixed_steps"] += CONTEXT in types and GENERATION in types
        # a prompt that does not fit the step's budget whole goes in chunks
        self.stats["chunks"] += sum(t == CONTEXT and n < len(r.prompt) for r, t, n in zip(chunks, types, counts))
        return chunks, types, counts

    def step(self, running):
        self.encode_admitted()
        return super().step(running)

    def forward(self, tokens, batch, chunks):
        model, cfg = self.model, self.model.cfg
        encoder_lengths, cross_table = self.cross.metadata([r.cross_slot for r in chunks])
        rel = model.rel_bias(encoder=False)

        def self_attend(i, qkv):
            k_pool, v_pool = self.pools[i]
            # every layer's pools share geometry and tables: validating the step at layer 0 covers them all
            return self._timed("self", attn.gpt_attention, qkv, batch, k_pool, v_pool, num_heads_q=cfg.heads_q,
                               num_heads_kv=cfg.heads_kv, rel_bias=rel, softmax_scale=1.0,
                               validate=i == 0)  # fmt: skip

        def cross_attend(i, q):
            k_pool, v_pool = self.cross_pools[i]
            opts = dict(softmax_scale=1.0, validate=i == 0)
            out = torch.empty_like(q)
            # one call per phase, as gpt_attention's split mode: the prompt chunks' rows packed (the context
            # kernel), the generation rows as padded one-token queries (the split-K decode kernel)
            if batch.context_rows.numel():
                reqs = batch.context_requests
                o = self._timed("cross", attn.cross_attention, q.index_select(0, batch.context_rows), k_pool, v_pool,
                                encoder_lengths.index_select(0, reqs), cu_seqlens_q=batch.cu_seqlens_context,
                                block_table=cross_table.index_select(0, reqs), **opts)  # fmt: skip
                out.index_copy_(0, batch.context_rows, o)
            if batch.generation_rows.numel():
                reqs = batch.generation_requests
                o = self._timed("cross", attn.cross_attention, q.index_select(0, batch.generation_rows)[:, None],
                                k_pool, v_pool, encoder_lengths.index_select(0, reqs),
                                block_table=cross_table.index_select(0, reqs), **opts)  # fmt: skip
                out.index_copy_(0, batch.generation_rows, o[:, 0])
            return out

        return model.decode(tokens, self_attend, cross_attend)


def make_encdec_requests(n, vocab, source_range, prompt_range, output_range, arrival_every, seed):
    """`attn.demo.make_requests`' requests, each with a random source of a length drawn from ``source_range``."""
    gen = torch.Generator().manual_seed(seed + 2)
    out = []
    for r in make_requests(n, vocab, prompt_range, output_range, arrival_every, seed):
        slen = int(torch.randint(source_range[0], source_range[1] + 1, (1,), generator=gen))
        source = torch.randint(0, vocab, (slen,), generator=gen).tolist()
        out.append(EncDecRequest(rid=r.rid, arrival=r.arrival, prompt=r.prompt, max_new=r.max_new, source=source))
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    if args.large:
        cfg = EncDecConfig(vocab=32000, enc_layers=6, layers=6, heads_q=16, heads_kv=4, head_dim=64, mlp=4096,
                           num_buckets=32, max_distance=128)  # fmt: skip
        dtype, budget, block_size, num_blocks, cross_blocks = torch.bfloat16, 1024, 32, 1024, 512
        source_range, prompt_range, output_range = (64, 1500), (1, 256), (16, 96)
        n_requests, every = args.requests or 32, 1.5
        # bf16 activations (unit roundoff 2^-9 ≈ 2e-3) rounded at every projection, residual add and attention
        # output of 6 + 6 layers: this model run entirely in bf16 PyTorch (attention included) differs from its
        # fp32 twin by 7e-3 to 9e-3 (sources of 64 to 1500 tokens, measured on a CPU); the kernels accumulate in
        # fp32, so the served path should not do worse. 5e-2 leaves a 5x margin, as in attn.demo's --large.
        tol = 5e-2
    else:
        cfg = EncDecConfig(vocab=64, enc_layers=2, layers=2, heads_q=4, heads_kv=2, head_dim=16, mlp=64,
                           num_buckets=16, max_distance=16)  # fmt: skip
        dtype, budget, block_size, num_blocks, cross_blocks = torch.float32, 8, 4, 24, 14
        source_range, prompt_range, output_range = (3, 24), (1, 14), (2, 5)
        n_requests, every = args.requests or 8, 0.75
        # fp32 on both paths: they differ by summation order only (errors ~1e-7); a wrong row or bias gives >1e-2
        tol = 1e-4
    model = TinyT5(cfg, device, dtype, seed=args.seed)
    naive = model.as_float32()
    server = EncDecServer(model, num_blocks=num_blocks, block_size=block_size, max_seqs=n_requests,
                          max_blocks_per_seq=num_blocks, token_budget=budget, cross_blocks=cross_blocks,
                          cross_blocks_per_seq=-(-source_range[1] // block_size))  # fmt: skip
    requests = make_encdec_requests(n_requests, cfg.vocab, source_range, prompt_range, output_range, every, args.seed)

    def check(r):
        # the served logits of this token against the cache-free recompute of the encoder and the whole decoder
        want = naive.naive_logits(torch.tensor(r.source, device=device), torch.tensor(r.tokens[:-1], device=device))
        return relative_error(r.last_logits, want[-1])

    out = serve(server, requests, check, tol)
    finished, wall, step = out["finished"], out["wall_s"], out["steps"]
    checked, worst, usage = out["logits_checked"], out["worst_logit_error"], out["usage"]
    generated = sum(len(r.output) for r in finished)
    prompt_tokens = sum(len(r.prompt) for r in finished)
    source_tokens = sum(len(r.source) for r in finished)
    parts = {name: s / wall for name, s in server.attention_parts.items()}
    report = {
        "device": str(device), "model": {**cfg.__dict__}, "requests": n_requests, "steps": step,
        "source_tokens": source_tokens, "prompt_tokens": prompt_tokens, "generated_tokens": generated,
        "wall_s": wall, "tokens_per_s": (source_tokens + prompt_tokens + generated) / wall,
        "generated_per_s": generated / wall, "attention_share": server.attention_s / wall,
        "attention_shares": parts, "logits_checked": checked, "worst_logit_error": worst, "tolerance": tol,
        "num_blocks": num_blocks, "cross_num_blocks": cross_blocks,
        "blocks_used": usage["blocks"], "cross_blocks_used": usage["cross blocks"],
        "peak_blocks": max(usage["blocks"]), "peak_cross_blocks": max(usage["cross blocks"]),
        "running": out["running"], **server.stats,
    }  # fmt: skip
    print(
        f"{n_requests} requests, {step} steps, {source_tokens} source + {prompt_tokens} prompt + {generated} "
        f"generated tokens in {wall:.1f} s: {report['tokens_per_s']:.0f} tokens/s ({report['generated_per_s']:.0f} "
        f"generated/s)"
    )
    print(f"{server.stats['encoder_passes']} encoder passes (up to {server.stats['encoder_batch_max']} sources packed "
          f"in one), {server.stats['mixed_steps']} steps mixing prompt chunks with generation tokens, "
          f"{server.stats['chunks']} partial prompt chunks; an arrived request waited for cross blocks at "
          f"{server.stats['cross_waits']} steps")  # fmt: skip
    print(f"attention (timed with a device sync) took {report['attention_share']:.0%} of the wall time, which "
          f"includes the naive checks: encoder {parts['encoder']:.0%}, decoder self-attention {parts['self']:.0%}, "
          f"cross attention {parts['cross']:.0%}")  # fmt: skip
    print(f"{checked} sampled tokens' logits matched the naive recompute (worst relative error {worst:.1e}, "
          f"tolerance {tol:.0e}); peak {report['peak_blocks']} of {num_blocks} self-attention blocks and "
          f"{report['peak_cross_blocks']} of {cross_blocks} cross blocks in use, all returned at the end: "
          f"{server.cache.allocator.num_used == 0 and server.cross.allocator.num_used == 0}")  # fmt: skip
    if args.plot:
        plot_over_time(args.plot, {"self-attention blocks in use": usage["blocks"],
                                   "cross blocks in use": usage["cross blocks"],
                                   "requests running": out["running"]})  # fmt: skip
    return report


def main(argv=None) -> dict:
    return run(arg_parser(__doc__).parse_args(argv))


if __name__ == "__main__":
    main()
