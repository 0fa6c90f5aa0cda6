"""Racecheck hazards of one log, counted by (kind, first access, second access) with each thread's warpgroup
(thread id // 128) and source line; the shared address is kept only where few distinct ones occur. Then the
hazards of each kind by CTA: a hazard that racecheck's model makes would show in every CTA that runs the code,
one that depends on an interleaving in a few.

    python -m bench.race_digest <racecheck log>...
"""

from __future__ import annotations

import re
import sys
from collections import Counter

HAZARD = re.compile(r"Potential (\w+) hazard detected at __shared__ (0x[0-9a-f]+) in block \(([0-9,]+)\)")
ACCESS = re.compile(r"(Read|Write) Thread \((\d+),\d+,\d+\) at (\w+)\+0x[0-9a-f]+ in (?:.*/)?([^/\s]+:\d+)")


def digest(text: str) -> Counter:
    counts: Counter = Counter()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = HAZARD.search(line)
        if not m:
            continue
        acc = [ACCESS.search(x) for x in lines[i + 1 : i + 3]]
        if not all(acc):
            continue
        (k1, t1, kern, at1), (k2, t2, _, at2) = (a.groups() for a in acc)
        counts[(m.group(1), kern, f"{k1} wg{int(t1) // 128} {at1}", f"{k2} wg{int(t2) // 128} {at2}", m.group(2))] += 1
    return counts


def by_cta(text: str) -> Counter:
    """Hazards counted by (kind, CTA), printed or not cut."""
    return Counter((m.group(1), m.group(3)) for m in HAZARD.finditer(text))


def main() -> None:
    for path in sys.argv[1:]:
        text = open(path, errors="replace").read()
        summary = re.findall(r"RACECHECK SUMMARY: .*", text)
        print(f"## {path}: {summary[-1] if summary else 'no summary'}")
        counts = digest(text)
        # many addresses of one access pair: one line per pair with the count of addresses
        pairs: Counter = Counter()
        addrs: dict = {}
        for (kind, kern, a, b, addr), n in counts.items():
            pairs[(kind, kern, a, b)] += n
            addrs.setdefault((kind, kern, a, b), set()).add(addr)
        for (kind, kern, a, b), n in pairs.most_common(20):
            where = addrs[(kind, kern, a, b)]
            shown = " ".join(sorted(where)) if len(where) <= 4 else f"{len(where)} addresses"
            print(f"{n:7d}  {kind}  {kern}  {a}  ->  {b}  {shown}")
        ctas = by_cta(text)
        for kind in sorted({k for k, _ in ctas}):
            per = sorted(((n, c) for (k, c), n in ctas.items() if k == kind), reverse=True)
            shown = ", ".join(f"({c}) x{n}" for n, c in per[:6]) + (f", ... {len(per)} CTAs" if len(per) > 6 else "")
            print(f"  {kind} by CTA: {shown}")


if __name__ == "__main__":
    main()
