"""MkDocs hooks for the attn site, named under ``hooks:`` in mkdocs.yml; not meant to be run by itself.

The site must work with no network at all, so:

- MathJax is served from the site. Its files come from the ``django-static-mathjax`` wheel on PyPI (MathJax
  3.2.2 as published by its authors, packaged as a Python module called ``mathjax``; Django is not needed).
  ``on_files`` adds the subset the pages use to the build, under ``assets/mathjax/``.
- Executed notebooks carry nbconvert's own loaders, which point at cdnjs: a MathJax 2 ``<script src>`` with
  its config block, and a Mermaid module that imports from the CDN when a page has diagrams.
  ``on_page_content`` removes them; the site-wide MathJax typesets notebook math as well.

The lessons execute in Jupyter kernels that this process starts, with its environment. ``on_startup`` sets
that environment up, so that a plain ``mkdocs build`` works as ``dev.py docs`` does:

- ``lessons/`` goes on ``PYTHONPATH``: the lessons import their drawing helpers (``lessons/_figures.py``) as
  ``import _figures``, as they do when run with ``python lessons/NN_topic.py``;
- ``tools/jupyter`` goes on ``JUPYTER_CONFIG_PATH``: its nbconvert config starts the kernels over IPC sockets
  instead of unencrypted TCP on the loopback (ipykernel warns about the latter, once per lesson), and without
  ``capture_fd_output``: what C/C++ code writes straight to file descriptor 2 (torch's profiler prints
  ``profiler_start``/``profiler_stop`` lines) goes to the build log, not into the page; Python's own warnings
  still reach the page, where tools/check_site.py fails them;
- without CUDA, ``TRITON_INTERPRET=1``: the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

MATHJAX_DEST = "assets/mathjax"
# tex-svg.js is the combined loader the pages include. SVG output draws glyphs from paths inside the script,
# so no web font is fetched (browsers refuse fonts to pages opened from disk). The folders hold what it loads
# lazily: TeX extensions on first use (autoload), and the menu's accessibility and speech tools.
MATHJAX_PARTS = ["tex-svg.js", "input", "a11y", "ui", "sre"]

_NB_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)
_NB_MERMAID = re.compile(r"<script type=\"module\">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*?</script>", re.S)
_EXTERNAL_SCRIPT = re.compile(r"<script[^>]*\ssrc=\"(?:https?:)?//[^\"]*\"[^>]*>\s*</script>", re.S)


ROOT = Path(__file__).resolve().parent.parent


def _prepend(var: str, path: Path) -> None:
    parts = [p for p in os.environ.get(var, "").split(os.pathsep) if p]
    if str(path) not in parts:
        os.environ[var] = os.pathsep.join([str(path), *parts])


def on_startup(command: str, dirty: bool) -> None:
    _prepend("PYTHONPATH", ROOT / "lessons")
    _prepend("JUPYTER_CONFIG_PATH", ROOT / "tools" / "jupyter")
    if "TRITON_INTERPRET" not in os.environ:
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
        if not cuda:
            os.environ["TRITON_INTERPRET"] = "1"


def _mathjax_root() -> Path:
    try:
        import mathjax
    except ImportError as err:
        raise PluginError(
            "MathJax is served from the site: install the docs extra, pip install -e '.[docs]' "
            "(it brings django-static-mathjax)"
        ) from err
    root = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (root / MATHJAX_PARTS[0]).is_file():
        raise PluginError(f"no MathJax {MATHJAX_PARTS[0]} under {root}")
    return root


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = _mathjax_root()
    for part in MATHJAX_PARTS:
        path = root / part
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in paths:
            rel = p.relative_to(root).as_posix()
            files.append(File.generated(config, f"{MATHJAX_DEST}/{rel}", abs_src_path=str(p)))
    return files


def on_page_content(html: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.src_uri.startswith("api/"):
        # docstrings cite the design notes' SPEC.md, which is not on the site; the semantics page is its public form
        html = html.replace("(see SPEC.md)", '(see <a href="../semantics.html">Semantics</a>)')
    html = _NB_MATHJAX.sub("", html)
    html = _NB_MERMAID.sub("", html)
    return _EXTERNAL_SCRIPT.sub("", html)
