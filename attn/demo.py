"""End-to-end demo: a small GPT-style decoder served with continuous batching, its attention all `attn`.

    python -m attn.demo                       # a tiny model, a handful of requests (on a CPU: Triton's interpreter)
    python -m attn.demo --large               # on a GPU: a bigger model and a longer stream of requests
    python -m attn.demo --soak 5000           # a soak: 5000 steps of random arrivals and ends, the pool short

Requests arrive at different steps with different prompt and output lengths. Every step the scheduler admits
what fits (a sequence slot and cache blocks), gives each running request its next token, and fills the rest of
a per-step token budget with prompt chunks. The whole step goes through the model as one packed buffer, and
each layer's attention is one `attn.gpt_attention` call over a paged KV cache: RoPE, the append of k/v, and
attention for context and generation tokens together. Blocks are taken as sequences grow and returned when
they finish.

Every logit the server produces for a sampled token is checked against a naive recompute: the same weights run
over the request's whole sequence without any cache, with plain causal attention in float32. The run fails
loudly on a mismatch. The random weights make the text meaningless; the point is that the serving path and the
naive path agree, step after step, while the batch composition keeps changing.

`attn.demo_encdec` serves an encoder-decoder model with the same request stream, server and loop (`Server`,
`serve`, `make_requests`), adding an encoder pass and a paged cross cache.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch

import attn
from attn.inflight import CONTEXT, GENERATION, InflightBatch
from attn.kv_cache import PagedKVCache, PoolExhaustedError


@dataclass(frozen=True)
class ModelConfig:
    vocab: int
    layers: int
    heads_q: int
    heads_kv: int
    head_dim: int
    mlp: int

    @property
    def width(self) -> int:
        return self.heads_q * self.head_dim


class TinyGPT:
    """Pre-norm decoder blocks (RMSNorm, fused QKV with bias, RoPE, GQA, SiLU MLP), random weights."""

    def __init__(self, cfg: ModelConfig, device, dtype, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.cfg, self.device, self.dtype = cfg, device, dtype
        w = cfg.width
        qkv = (cfg.heads_q + 2 * cfg.heads_kv) * cfg.head_dim

        def param(*shape, scale):
            return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

        self.embed = param(cfg.vocab, w, scale=1.0)
        self.blocks = [
            {
                "qkv": param(w, qkv, scale=1 / math.sqrt(w)),
                "qkv_bias": param(qkv, scale=0.1),
                "out": param(w, w, scale=1 / math.sqrt(w)),
                "up": param(w, cfg.mlp, scale=1 / math.sqrt(w)),
                "down": param(cfg.mlp, w, scale=1 / math.sqrt(cfg.mlp)),
            }
            for _ in range(cfg.layers)
        ]
        self.head = param(w, cfg.vocab, scale=1 / math.sqrt(w))

    @staticmethod
    def _norm(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    def forward(self, tokens, attend):
        """Logits for ``tokens [T]``; ``attend(layer, qkv [T, (Hq+2Hkv)·D], bias)`` returns ``[T, Hq, D]``."""
        x = self.embed[tokens]
        for i, blk in enumerate(self.blocks):
            o = attend(i, self._norm(x) @ blk["qkv"], blk["qkv_bias"])
            x = x + o.reshape(x.shape[0], -1) @ blk["out"]
            h = self._norm(x) @ blk["up"]
            x = x + torch.nn.functional.silu(h) @ blk["down"]
        return self._norm(x) @ self.head

    def as_float32(self) -> TinyGPT:
        """The same weights (as this model rounded them) in float32, for the naive recompute."""
        twin = object.__new__(TinyGPT)
        twin.cfg, twin.device, twin.dtype = self.cfg, self.device, torch.float32
        twin.embed, twin.head = self.embed.float(), self.head.float()
        twin.blocks = [{key: w.float() for key, w in blk.items()} for blk in self.blocks]
        return twin

    def naive_logits(self, tokens):
        """The model over one whole sequence, with no cache and plain causal attention: the reference for
        every served step (call it on `as_float32`'s twin)."""
        cfg = self.cfg
        d = cfg.head_dim
        pos = torch.arange(len(tokens), device=self.device, dtype=torch.int32)
        cu = torch.tensor([0, len(tokens)], dtype=torch.int32, device=self.device)

        def attend(i, qkv, bias):
            heads = (qkv.float() + bias.float()).view(len(tokens), cfg.heads_q + 2 * cfg.heads_kv, d)
            q = attn.reference.apply_rope(heads[:, : cfg.heads_q], pos, rotary_dim=d)
            k = attn.reference.apply_rope(heads[:, cfg.heads_q : cfg.heads_q + cfg.heads_kv], pos, rotary_dim=d)
            v = heads[:, cfg.heads_q + cfg.heads_kv :]
            return attn.reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)

        return self.forward(tokens, attend)


@dataclass
class Request:
    rid: int
    arrival: int
    prompt: list[int]
    max_new: int
    slot: int | None = None
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    finished_at: int | None = None
    last_logits: torch.Tensor | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Server:
    """Continuous batching over a paged KV cache per layer (one block table shared by all layers).

    The pieces other demos reuse (`attn.demo_encdec` subclasses it): admission by whole-lifetime block
    commitment (`can_admit`, `admit`, `finish`), the per-step schedule and its block reservation (`step`), and
    the sampling of each request's last row. A model plugs in through `forward`.
    """

    def __init__(self, model, *, num_blocks, block_size, max_seqs, max_blocks_per_seq, token_budget):
        cfg = model.cfg
        self.model, self.token_budget = model, token_budget
        self.cache = PagedKVCache(num_blocks=num_blocks, block_size=block_size, num_heads_kv=cfg.heads_kv,
                                  head_dim=cfg.head_dim, max_seqs=max_seqs, max_blocks_per_seq=max_blocks_per_seq,
                                  dtype=model.dtype, device=model.device)  # fmt: skip
        # layer 0 uses the cache object's own pools; the other layers get pools of the same shape
        self.pools = [(self.cache.k, self.cache.v)] + [
            (torch.zeros_like(self.cache.k), torch.zeros_like(self.cache.v)) for _ in range(cfg.layers - 1)
        ]
        self.attention_s = 0.0
        self.committed = 0

    def lifetime_blocks(self, r: Request) -> int:
        """The self-attention blocks ``r`` holds when it finishes: prompt plus its whole output."""
        return -(-(len(r.prompt) + r.max_new) // self.cache.block_size)

    def can_admit(self, r: Request) -> bool:
        """Whether the pool can hold ``r``'s whole lifetime besides what running requests may still take (this
        demo does not preempt, so a request admitted never runs short of a block)."""
        return self.committed + self.lifetime_blocks(r) <= self.cache.allocator.num_blocks

    def admit(self, r: Request) -> None:
        self.committed += self.lifetime_blocks(r)
        r.slot = self.cache.add_sequence()

    def finish(self, r: Request) -> None:
        """Returns a finished request's blocks to the pool."""
        self.cache.release(r.slot)
        self.committed -= self.lifetime_blocks(r)

    def usage(self) -> dict[str, tuple[int, int]]:
        """``{pool name: (blocks in use, blocks in the pool)}``, for the progress bar and the report."""
        return {"blocks": (self.cache.allocator.num_used, self.cache.allocator.num_blocks)}

    def schedule(self, running: list[Request]):
        """This step's ``(requests, types, new token counts)``: every running request's next token first (they
        are latency-bound), then prompt chunks in arrival order, within the token budget."""
        types, counts, chunks = [], [], []
        budget = self.token_budget
        for r in running:
            if r.prefilled == len(r.prompt) and budget > 0:
                types.append(GENERATION), counts.append(1), chunks.append(r)
                budget -= 1
        for r in running:
            if r.prefilled < len(r.prompt) and budget > 0:
                n = min(len(r.prompt) - r.prefilled, budget)
                types.append(CONTEXT), counts.append(n), chunks.append(r)
                budget -= n
        return chunks, types, counts

    def step(self, running: list[Request]) -> list[Request]:
        """Schedules one step over ``running`` and returns the requests that produced a token."""
        chunks, types, counts = self.schedule(running)
        if not chunks:
            return []
        slots = [r.slot for r in chunks]
        self.cache.reserve_tokens(slots, counts)
        past = [self.cache.length(s) for s in slots]
        _, table = self.cache.metadata(slots)
        batch = InflightBatch.build(types, counts, past, block_table=table)
        tokens = []
        for r, kind, n in zip(chunks, types, counts):
            tokens += r.prompt[r.prefilled : r.prefilled + n] if kind == CONTEXT else [r.tokens[-1]]
        logits = self.forward(torch.tensor(tokens, device=self.model.device), batch, chunks)
        self.cache.advance(slots, counts)
        produced = []
        ends = batch.cu_seqlens_new[1:].tolist()
        for r, kind, n, end in zip(chunks, types, counts, ends):
            if kind == CONTEXT:
                r.prefilled += n
                if r.prefilled < len(r.prompt):
                    continue  # a middle chunk: no token to sample yet
            row = logits[end - 1]
            r.output.append(int(row.argmax()))
            r.last_logits = row
            produced.append(r)
        return produced

    def timed(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, its time (with a device sync) added to ``attention_s``."""
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize()
        self.attention_s += time.perf_counter() - t0
        return out

    def forward(self, tokens: torch.Tensor, batch: InflightBatch, chunks: list[Request]) -> torch.Tensor:
        """The model over one step's packed ``tokens [T]``: logits ``[T, vocab]``."""
        cfg = self.model.cfg

        def attend(i, qkv, bias):
            k_pool, v_pool = self.pools[i]
            # every layer's pool has the same geometry and the same table: checking the step once is enough
            return self.timed(attn.gpt_attention, qkv, batch, k_pool, v_pool, num_heads_q=cfg.heads_q,
                              num_heads_kv=cfg.heads_kv, qkv_bias=bias, rotary_dim=cfg.head_dim,
                              validate=i == 0)  # fmt: skip

        return self.model.forward(tokens, attend)


def make_requests(n, vocab, prompt_range, output_range, arrival_every, seed):
    """``n`` requests with random prompts, lengths drawn uniformly from the inclusive ranges; request ``i``
    arrives at step ``int(i · arrival_every)`` (a fractional spacing makes some arrive together)."""
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(n):
        plen = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=gen))
        max_new = int(torch.randint(output_range[0], output_range[1] + 1, (1,), generator=gen))
        prompt = torch.randint(0, vocab, (plen,), generator=gen).tolist()
        out.append(Request(rid=i, arrival=int(i * arrival_every), prompt=prompt, max_new=max_new))
    return out


def progress(done, total, step, usage: dict[str, tuple[int, int]], width=28):
    """One status line, rewritten in place: requests done, the step, and ``{pool: (used, size)}``."""
    filled = int(width * done / max(total, 1))
    bar = "#" * filled + "." * (width - filled)
    pools = "".join(f" | {name} {used}/{size}" for name, (used, size) in usage.items())
    sys.stdout.write(f"\r[{bar}] {done}/{total} requests done | step {step}{pools}")
    sys.stdout.flush()


def serve(server, pending: list[Request], check, tol: float) -> dict:
    """The serving loop: admit arrived requests while ``server.can_admit`` them, run a step, check every sampled
    token with ``check(r)`` (a relative error against a naive recompute), release finished requests.

    Raises:
        AssertionError: a token's error above ``tol``.

    Returns:
        ``finished`` requests, ``steps``, ``logits_checked``, ``worst_logit_error``, ``wall_s``, ``running``
        (requests in flight per step) and ``usage`` (per pool of `server.usage`, blocks in use after each step).
    """
    total = len(pending)
    pending = list(pending)
    running, finished, batch_sizes = [], [], []
    usage = {name: [] for name in server.usage()}
    checked, worst, step = 0, 0.0, 0
    device = server.model.device
    start = time.perf_counter()
    while pending or running:
        while pending and pending[0].arrival <= step and server.can_admit(pending[0]):
            r = pending.pop(0)
            server.admit(r)
            running.append(r)
        produced = server.step(running)
        batch_sizes.append(len(running))
        for r in produced:
            err = check(r)
            worst, checked = max(worst, err), checked + 1
            if not err <= tol:
                raise AssertionError(f"request {r.rid}, token {len(r.output)}: logits differ from the naive "
                                     f"recompute by {err:.2e} (tolerance {tol:.0e})")  # fmt: skip
            if len(r.output) == r.max_new:
                r.finished_at = step
                server.finish(r)
                running.remove(r)
                finished.append(r)
        now = server.usage()
        for name, (used, _) in now.items():
            usage[name].append(used)
        step += 1
        progress(len(finished), total, step, now)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    print()
    return {"finished": finished, "steps": step, "logits_checked": checked, "worst_logit_error": worst,
            "wall_s": wall, "running": batch_sizes, "usage": usage}  # fmt: skip


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` over a logit row, in float32."""
    return ((got.float() - want).norm() / want.norm()).item()


def plot_over_time(path: str, series: dict[str, list[int]]) -> None:
    """Saves ``{label: value per step}`` as step curves to ``path``, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 3))
    for label, values in series.items():
        ax.step(range(len(values)), values, where="post", label=label)
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def run(args) -> dict:
    device = torch.device(args.device)
    if args.large:
        cfg = ModelConfig(vocab=32000, layers=8, heads_q=32, heads_kv=8, head_dim=128, mlp=8192)
        dtype, budget, block_size, num_blocks = torch.bfloat16, 2048, 64, 2048
        prompt_range, output_range, n_requests, every = (64, 1500), (16, 128), args.requests or 64, 2
        tol = 5e-2  # bf16 through 8 layers against an fp32 recompute
    else:
        cfg = ModelConfig(vocab=64, layers=2, heads_q=4, heads_kv=2, head_dim=16, mlp=64)
        dtype, budget, block_size, num_blocks = torch.float32, 16, 8, 24
        prompt_range, output_range, n_requests, every = (3, 30), (2, 8), args.requests or 10, 2
        tol = 1e-4  # fp32 everywhere: the two paths differ by summation order only
    model = TinyGPT(cfg, device, dtype, seed=args.seed)
    naive = model.as_float32()
    server = Server(model, num_blocks=num_blocks, block_size=block_size, max_seqs=n_requests,
                    max_blocks_per_seq=num_blocks, token_budget=budget)  # fmt: skip
    requests = make_requests(n_requests, cfg.vocab, prompt_range, output_range, every, args.seed)

    def check(r):
        # the served logits of this token against the naive recompute over the whole sequence so far
        want = naive.naive_logits(torch.tensor(r.tokens[:-1], device=device))[-1]
        return relative_error(r.last_logits, want)

    out = serve(server, requests, check, tol)
    finished, wall, step, blocks_used = out["finished"], out["wall_s"], out["steps"], out["usage"]["blocks"]
    checked, worst = out["logits_checked"], out["worst_logit_error"]
    generated = sum(len(r.output) for r in finished)
    prompt_tokens = sum(len(r.prompt) for r in finished)
    report = {
        "device": str(device), "model": cfg.__dict__, "requests": n_requests, "steps": step,
        "prompt_tokens": prompt_tokens, "generated_tokens": generated, "wall_s": wall,
        "tokens_per_s": (generated + prompt_tokens) / wall, "generated_per_s": generated / wall,
        "attention_share": server.attention_s / wall, "logits_checked": checked, "worst_logit_error": worst,
        "peak_blocks": max(blocks_used), "num_blocks": num_blocks, "blocks_used": blocks_used,
        "running": out["running"],
    }  # fmt: skip
    print(
        f"{n_requests} requests, {step} steps, {prompt_tokens} prompt + {generated} generated tokens in "
        f"{wall:.1f} s: {report['tokens_per_s']:.0f} tokens/s ({report['generated_per_s']:.0f} generated/s)"
    )
    print(f"attention (every gpt_attention call, timed with a device sync) took {report['attention_share']:.0%} "
          f"of the wall time, which includes the naive checks")  # fmt: skip
    print(f"{checked} sampled tokens' logits matched the naive recompute (worst relative error {worst:.1e}); "
          f"peak {report['peak_blocks']} of {num_blocks} cache blocks in use, all returned at the end: "
          f"{server.cache.allocator.num_used == 0}")  # fmt: skip
    if args.plot:
        plot_over_time(args.plot, {"cache blocks in use": blocks_used, "requests running": out["running"]})
    return report


class SoakServer(Server):
    """`Server` with the pool kept short: requests are admitted while a slot and a block are free, not for their
    whole lifetime, so a step can find the pool exhausted. It then preempts (vLLM's recompute preemption): the
    request admitted last gives back its slot and blocks and waits to be served again from its prompt; the step
    is retried. This relies on the cache being transactional: the failed reservation changed nothing."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.preemptions = 0
        self.exhausted = 0

    def can_admit(self, r: Request) -> bool:
        c = self.cache
        return len(c.live) < c.max_seqs and c.allocator.num_free > 0

    def admit(self, r: Request) -> None:
        r.slot = self.cache.add_sequence()

    def finish(self, r: Request) -> None:
        self.cache.release(r.slot)
        r.slot = None

    def step_or_preempt(self, running: list[Request]) -> tuple[list[Request], list[Request]]:
        """One step; on an exhausted pool preempts the latest admitted request and retries.

        Returns:
            ``(produced, preempted)``: the requests that got a token, and those sent back to wait.

        Raises:
            PoolExhaustedError: a single running request does not fit the pool (a configuration error).
        """
        preempted = []
        while True:
            try:
                return self.step(running), preempted
            except PoolExhaustedError:
                self.exhausted += 1
                if len(running) == 1:
                    raise
                victim = running.pop()
                self.finish(victim)
                victim.prefilled, victim.output, victim.last_logits = 0, [], None
                preempted.append(victim)
                self.preemptions += 1


def soak(server: SoakServer, steps: int, check, tol: float, *, vocab: int, seed: int, arrival_p: float = 0.5,
         cancel_p: float = 0.02, prompt_range=(1, 40), output_range=(1, 24)) -> dict:  # fmt: skip
    """``steps`` serving steps with random arrivals (one with probability ``arrival_p`` a step), random ends
    (a running request is cancelled with probability ``cancel_p`` a step, or ends at its ``max_new`` tokens),
    and preemption whenever the pool runs out. Every sampled token is checked with ``check(r)``; at the end the
    remaining requests are cancelled and every block and slot must be back.

    Raises:
        AssertionError: a token's error above ``tol``, or a block or slot not returned at the end.
    """
    gen = torch.Generator().manual_seed(seed + 7)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    pending, running = [], []
    stats = dict(arrived=0, finished=0, cancelled=0, checked=0, worst=0.0, peak_blocks=0, peak_running=0)
    next_id = 0
    for step in range(steps):
        if float(torch.rand(1, generator=gen)) < arrival_p:
            prompt = torch.randint(0, vocab, (draw(*prompt_range),), generator=gen).tolist()
            pending.append(Request(rid=next_id, arrival=step, prompt=prompt, max_new=draw(*output_range)))
            next_id += 1
            stats["arrived"] += 1
        for r in list(running):
            if float(torch.rand(1, generator=gen)) < cancel_p:
                server.finish(r)
                running.remove(r)
                stats["cancelled"] += 1
        while pending and server.can_admit(pending[0]):
            r = pending.pop(0)
            server.admit(r)
            running.append(r)
        produced, preempted = server.step_or_preempt(running)
        pending[:0] = preempted  # they go first when room comes back
        for r in produced:
            err = check(r)
            stats["worst"], stats["checked"] = max(stats["worst"], err), stats["checked"] + 1
            if not err <= tol:
                raise AssertionError(f"step {step}, request {r.rid}, token {len(r.output)}: logits differ from the "
                                     f"naive recompute by {err:.2e} (tolerance {tol:.0e})")  # fmt: skip
            if len(r.output) == r.max_new:
                server.finish(r)
                running.remove(r)
                stats["finished"] += 1
        stats["peak_blocks"] = max(stats["peak_blocks"], server.cache.allocator.num_used)
        stats["peak_running"] = max(stats["peak_running"], len(running))
        if step % 50 == 0 or step == steps - 1:
            progress(step + 1, steps, step + 1, server.usage())
    print()
    for r in running:
        server.finish(r)
        stats["cancelled"] += 1
    c = server.cache
    leaked = c.allocator.num_used
    if leaked or c.allocator.num_free != c.allocator.num_blocks or c.live:
        raise AssertionError(f"after the soak {leaked} blocks are still in use and slots {c.live} are live")
    stats.update(steps=steps, preemptions=server.preemptions, exhausted=server.exhausted, leaked_blocks=leaked,
                 waiting=len(pending))  # fmt: skip
    return stats


def run_soak(args) -> dict:
    """``--soak N``: the tiny model in float32 over a 40-block pool of 4-token blocks (three long requests fill
    it), N steps, every token checked against the naive recompute."""
    device = torch.device(args.device)
    cfg = ModelConfig(vocab=64, layers=2, heads_q=4, heads_kv=2, head_dim=16, mlp=64)
    model = TinyGPT(cfg, device, torch.float32, seed=args.seed)
    naive = model.as_float32()
    server = SoakServer(model, num_blocks=40, block_size=4, max_seqs=8, max_blocks_per_seq=40, token_budget=24)

    def check(r):
        want = naive.naive_logits(torch.tensor(r.tokens[:-1], device=device))[-1]
        return relative_error(r.last_logits, want)

    t0 = time.perf_counter()
    stats = soak(server, args.soak, check, 1e-4, vocab=cfg.vocab, seed=args.seed)
    stats["wall_s"] = time.perf_counter() - t0
    print(
        f"soak: {stats['steps']} steps, {stats['arrived']} requests arrived, {stats['finished']} finished, "
        f"{stats['cancelled']} cancelled, {stats['preemptions']} preemptions after {stats['exhausted']} exhausted "
        f"reservations; {stats['checked']} tokens checked (worst relative error {stats['worst']:.1e}); peak "
        f"{stats['peak_blocks']}/40 blocks, {stats['leaked_blocks']} leaked; {stats['wall_s']:.1f} s"
    )
    return stats


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The command-line options of this demo and of `attn.demo_encdec`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--large", action="store_true", help="the bigger model and request stream (for a GPU)")
    p.add_argument("--requests", type=int, default=0, help="how many requests (0: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="", help="save blocks in use over time to this image file")
    p.add_argument("--soak", type=int, default=0, help="run a soak of this many steps instead (see SoakServer)")
    return p


def main(argv=None) -> dict:
    args = arg_parser(__doc__).parse_args(argv)
    return run_soak(args) if args.soak else run(args)


if __name__ == "__main__":
    main()
