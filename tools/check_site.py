"""Smoke test of the built docs site in a real headless browser.

    python tools/check_site.py [SITE_DIR]        # default: site

    python tools/check_site.py site --shots DIR  # also save a screenshot of every page (and every bad figure)

Serves SITE_DIR on 127.0.0.1 and opens every page of it (each ``.html`` but 404 and search) in Debian's
``chromium`` (``apt-get install chromium``), at a laptop's width (1280 px), driven through the DevTools
protocol over a pipe (``--remote-debugging-pipe``), so nothing beyond the standard library and the browser is
needed; the home page and a lesson are also opened straight from disk (``file://``), as a reader without a
server would. A page fails if

- the browser logs a console error or an uncaught exception,
- any request leaves the loopback interface (the site must work air-gapped), or anything is not found,
- its math is not typeset: MathJax must have produced ``mjx-container`` elements, none of them a TeX error,
  and no ``$...$``, ``\\(...\\)`` or ``\\[...\\]`` may be left in the visible text;
- a figure is illegible: an image shrunk so far that its text would render below ``MIN_TEXT_PX`` (8 pt, the
  smallest size the lessons' figures use, at the PNG's own dpi from its pHYs chunk, times rendered width over
  natural width), or wider than the page;
- a code block hides text: its content is wider than its box and the box does not scroll;
- a notebook cell wrote to stderr (a warning shown in the page).

Prints one line per page and a PASS/FAIL summary; exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import unquote, urlsplit

# least number of typeset formulas expected on pages that have math; every other page is checked for 0
MIN_MATH = dict([
    ("index.html", 3),
    ("lessons/01_attention.html", 20),
    ("lessons/02_context_phase.html", 20),
    ("lessons/03_kv_cache_decode.html", 20),
    ("lessons/04_paged_kv_cache.html", 10),
    ("lessons/05_multi_block_decode.html", 20),
    ("lessons/06_alibi.html", 20),
    ("lessons/07_rope.html", 20),
    ("lessons/08_relative_bias.html", 10),
    ("lessons/09_kv_quantization.html", 10),
    ("lessons/10_sliding_window_and_sinks.html", 10),
    ("lessons/11_beam_search.html", 10),
    ("lessons/16_distributed.html", 10),
])  # fmt: skip
SKIP = {"404.html", "search.html"}
# readers may also open the files straight from disk, with no server at all
FILE_PAGES = [("index.html", 3), ("lessons/01_attention.html", 20)]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
PAGE_TIMEOUT_S = 60
VIEWPORT = (1280, 900)
# the smallest text the lessons' figures use, and how tall it must come out on screen (Material's body text
# is 13.6 px; 7.5 px is where digits still read at a glance)
FIGURE_TEXT_PT = 8
MIN_TEXT_PX = 7.5
# the highest dpi matplotlib writes into a PNG we expect; an image without a pHYs chunk is assumed 100 dpi
DEFAULT_DPI = 100

# Images, with their natural and rendered sizes, and code blocks whose text does not fit and cannot scroll.
LAYOUT_JS = r"""
(() => {
  const imgs = [...document.querySelectorAll("article img, .md-content img")].map((im, n) => {
    const r = im.getBoundingClientRect();
    const box = im.closest("article, .md-content").getBoundingClientRect();
    return {n, src: im.currentSrc || im.src, natural: im.naturalWidth, width: r.width, height: r.height,
            overflow: r.right - box.right, top: r.top + window.scrollY, left: r.left};
  });
  const hidden = [];
  for (const el of document.querySelectorAll("pre, .highlight-ipynb, .jp-OutputArea-output, .jp-InputArea-editor")) {
    const cs = getComputedStyle(el);
    if (el.scrollWidth > el.clientWidth + 2 && ["hidden", "clip"].includes(cs.overflowX)) {
      hidden.push((el.innerText || "").trim().split("\n")[0].slice(0, 60));
    }
  }
  const stderrSel = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]';
  const firstLine = (el) => (el.innerText || "").trim().split("\n")[0].slice(0, 100);
  const stderr = [...document.querySelectorAll(stderrSel)].map(firstLine);
  return JSON.stringify({imgs, hidden: hidden.slice(0, 5), stderr: stderr.slice(0, 5)});
})()
"""

# Runs in the page once MathJax has finished: what was typeset, and what looks like math left untouched.
# Code, preformatted text and MathJax's own output are skipped: dollars there are not math.
INSPECT_JS = r"""
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const skip = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "TEXTAREA", "MJX-CONTAINER"]);
  const leftovers = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    let p = n.parentElement, skipped = false;
    // div.clipboard-copy-txt: a code cell's source for the copy button (hidden; MathJax ignores it too)
    for (; p; p = p.parentElement) {
      if (skip.has(p.tagName) || p.classList.contains("clipboard-copy-txt")) { skipped = true; break; }
    }
    if (!skipped && /\$|\\\(|\\\[/.test(n.textContent)) leftovers.push(n.textContent.trim().slice(0, 80));
  }
  return JSON.stringify({
    mathjax: !!(window.MathJax && MathJax.version),
    typeset: document.querySelectorAll("mjx-container").length,
    errors: document.querySelectorAll("mjx-merror").length,
    leftovers: leftovers.slice(0, 5),
  });
})()
"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    failures: list[str] = []

    def log_message(self, format, *args):
        pass

    def log_request(self, code="-", size="-"):
        if str(code).isdigit() and int(code) >= 400:
            self.failures.append(f"server answered {code} for {self.path}")


def _serve(site: str) -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    failures: list[str] = []
    handler = type("Handler", (_Handler,), {"failures": failures})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=site))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, failures


class Browser:
    """A headless chromium spoken to through the DevTools protocol on fds 3 (commands) and 4 (replies)."""

    def __init__(self, exe: str, profile: str):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # park the child's ends above 10 so the dup2 onto 3 and 4 below never collides with them
        hi_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r)
        os.close(from_child_w)

        def child_fds():
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        args = [
            exe,
            "--headless",
            "--remote-debugging-pipe",
            # root on CI: chromium refuses to start sandboxed as root
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # an air-gapped reader's browser, simulated: every name but the loopback fails to resolve, so a
            # stray external request fails fast (and is reported) instead of hanging the check
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args, pass_fds=(3, 4), preexec_fn=child_fds, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        os.close(hi_r)
        os.close(hi_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("the browser stopped answering")
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"the browser exited: {err[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while True:
            for ev in self.events[seen:]:
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_child)
        os.close(self._from_child)


def _problems(events: list[dict], session: str) -> list[str]:
    out = []
    for ev in events:
        if ev.get("sessionId") != session:
            continue
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Network.requestWillBeSent":
            url = p["request"]["url"]
            parts = urlsplit(url)
            if parts.scheme not in ("data", "blob", "about", "file") and parts.hostname not in LOOPBACK:
                out.append(f"request leaves the machine: {url}")
        elif method == "Network.responseReceived" and p["response"]["status"] >= 400:
            out.append(f"HTTP {p['response']['status']} for {p['response']['url']}")
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"request failed ({p.get('errorText')}) [{p.get('type')}]")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            out.append(f"console.{p['type']}: {text[:300]}")
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append(f"uncaught exception: {d.get('exception', {}).get('description', d.get('text'))[:300]}")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            e = p["entry"]
            out.append(f"browser log error: {e.get('text', '')[:300]} {e.get('url', '')}")
    return out


def _png_dpi(data: bytes) -> float | None:
    """The dpi a PNG states in its pHYs chunk (matplotlib writes it), or None."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    i = 8
    while i + 8 <= len(data):
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        if kind == b"pHYs" and length == 9:
            ppu = int.from_bytes(data[i + 8 : i + 12], "big")
            return ppu * 0.0254 if data[i + 16] == 1 else None
        if kind == b"IDAT":
            return None
        i += 12 + length
    return None


def _image_bytes(src: str, site: pathlib.Path, base: str) -> bytes | None:
    if src.startswith("data:image/png;base64,"):
        return base64.b64decode(src.split(",", 1)[1])
    for prefix in (base, site.resolve().as_uri() + "/"):
        if src.startswith(prefix):
            path = site / unquote(src[len(prefix) :].split("#")[0].split("?")[0])
            return path.read_bytes() if path.is_file() else None
    return None


def _figure_problems(info: dict, site: pathlib.Path, base: str) -> tuple[list[str], list[dict]]:
    problems, bad = [], []
    for im in info["imgs"]:
        if not im["natural"] or not im["width"]:
            continue
        data = _image_bytes(im["src"], site, base)
        dpi = (_png_dpi(data) if data else None) or DEFAULT_DPI
        text_px = FIGURE_TEXT_PT * dpi / 72 * im["width"] / im["natural"]
        name = "inline image" if im["src"].startswith("data:") else im["src"].rsplit("/", 1)[-1]
        where = f"figure {im['n'] + 1} ({name}, {im['natural']} px at {dpi:.0f} dpi shown {im['width']:.0f} px)"
        if text_px < MIN_TEXT_PX:
            problems.append(f"{where}: {FIGURE_TEXT_PT} pt text renders {text_px:.1f} px high (< {MIN_TEXT_PX})")
            bad.append(im)
        elif im["overflow"] > 2:
            problems.append(f"{where}: sticks out of the page by {im['overflow']:.0f} px")
            bad.append(im)
    for text in info["hidden"]:
        problems.append(f"code block clipped, not scrollable: {text!r}")
    for text in info["stderr"]:
        # a lesson's warnings belong fixed or filtered in the lesson, not printed on the page in pink
        problems.append(f"a cell wrote to stderr: {text!r}")
    return problems, bad


def _screenshot(browser: Browser, session: str, path: pathlib.Path, clip: dict | None = None) -> None:
    params = {"format": "png", "captureBeyondViewport": True}
    if clip is None:
        height = browser.send(
            "Runtime.evaluate",
            {"expression": "document.documentElement.scrollHeight", "returnByValue": True},
            session=session,
        )["result"]["value"]
        clip = {"x": 0, "y": 0, "width": VIEWPORT[0], "height": min(height, 16000)}
        params["clip"] = {**clip, "scale": 0.5}
    else:
        params["clip"] = {**clip, "scale": 1}
    shot = browser.send("Page.captureScreenshot", params, session=session, timeout=PAGE_TIMEOUT_S)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def check_page(
    browser: Browser, url: str, rel: str, min_math: int, site: pathlib.Path, base: str, shots: pathlib.Path | None
) -> list[str]:
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Network", "Runtime", "Log", "Page"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride",
                 {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False},
                 session=session)  # fmt: skip
    start = len(browser.events)
    browser.send("Page.navigate", {"url": url}, session=session)
    browser.wait_event("Page.loadEventFired", session, PAGE_TIMEOUT_S)
    result = browser.send(
        "Runtime.evaluate",
        {"expression": INSPECT_JS, "awaitPromise": True, "returnByValue": True},
        session=session,
        timeout=PAGE_TIMEOUT_S,
    )
    if "exceptionDetails" in result:
        return [f"page inspection failed: {result['exceptionDetails'].get('text')}"]
    info = json.loads(result["result"]["value"])
    # fonts and lazily loaded MathJax parts arrive after typesetting; let them land before judging
    time.sleep(1.0)
    browser.send("Runtime.evaluate", {"expression": "1"}, session=session)
    problems = _problems(browser.events[start:], session)
    if min_math:
        if not info["mathjax"]:
            problems.append("MathJax is not loaded")
        if info["typeset"] < min_math:
            problems.append(f"only {info['typeset']} formulas typeset, expected at least {min_math}")
    if info["errors"]:
        problems.append(f"{info['errors']} formulas with TeX errors")
    for text in info["leftovers"]:
        problems.append(f"math left untypeset: {text!r}")
    layout = browser.send("Runtime.evaluate", {"expression": LAYOUT_JS, "returnByValue": True}, session=session)
    fig_problems, bad = _figure_problems(json.loads(layout["result"]["value"]), site, base)
    problems += fig_problems
    if shots is not None:
        stem = ("file_" if url.startswith("file:") else "") + rel.removesuffix(".html").replace("/", "_")
        _screenshot(browser, session, shots / f"{stem}.png")
        for im in bad:
            clip = {
                "x": max(0, im["left"]),
                "y": im["top"],
                "width": max(1, im["width"]),
                "height": max(1, im["height"]),
            }
            _screenshot(browser, session, shots / f"{stem}_figure{im['n'] + 1}.png", clip)
    browser.send("Target.closeTarget", {"targetId": target})
    print(f"  {'ok  ' if not problems else 'FAIL'} {url}  ({info['typeset']} formulas typeset)", flush=True)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", nargs="?", default="site", help="the built site folder (default: site)")
    parser.add_argument("--browser", default=None, help="browser executable (default: chromium on PATH)")
    parser.add_argument("--shots", default=None, help="save a screenshot of each page (and each bad figure) here")
    args = parser.parse_args()
    exe = args.browser or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        print("FAIL: no chromium on PATH (Debian: apt-get install -y chromium)")
        return 2
    if not os.path.isfile(os.path.join(args.site, "index.html")):
        print(f"FAIL: {args.site}/index.html not found; build the site first (mkdocs build --strict)")
        return 2

    server, server_failures = _serve(args.site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    print(f"checking {args.site} at {base} with {exe}", flush=True)
    site = pathlib.Path(args.site)
    site_url = site.resolve().as_uri() + "/"
    found = sorted(
        p.relative_to(site).as_posix()
        for p in site.rglob("*.html")
        if p.name not in SKIP and not p.relative_to(site).as_posix().startswith("assets/")
    )
    missing = [p for p in MIN_MATH if p not in found]
    pages = [(base + p, p, MIN_MATH.get(p, 0)) for p in found] + [(site_url + p, p, n) for p, n in FILE_PAGES]
    shots = pathlib.Path(args.shots) if args.shots else None
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="attn-check-site-") as profile:
        browser = Browser(exe, profile)
        try:
            for url, rel, min_math in pages:
                for problem in check_page(browser, url, rel, min_math, site, base, shots):
                    failures.append(f"{url}: {problem}")
        except Exception as err:
            failures.append(f"browser session failed: {type(err).__name__}: {err}")
        finally:
            browser.close()
            server.shutdown()
    failures += server_failures
    failures += [f"{p}: expected page not built" for p in missing]

    if failures:
        for f in dict.fromkeys(failures):
            print(f"  - {f}")
        print(f"FAIL: {len(failures)} problem(s) in {len(pages)} page loads")
        return 1
    print(f"PASS: {len(pages)} page loads (server and file://): no console errors, no outside requests, math "
          "typeset, figures legible, no clipped code")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
