// Markdown pages reach MathJax through pymdownx.arithmatex, which wraps math in \( \) and \[ \].
// Executed notebooks do not: nbconvert leaves the author's $...$ and $$...$$ as they are, so both
// delimiter pairs are accepted, and no class filter is set (notebook math carries no arithmatex class).
// MathJax skips <pre> and <code>, so dollars in code stay text; write \$ for a literal dollar in prose.
// mkdocs-jupyter also keeps each code cell's source as plain text in a hidden div.clipboard-copy-txt (what its
// copy button copies); MathJax must leave that alone too, or a copied cell holding "\(" or two "$" breaks.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: "tex2jax_ignore|clipboard-copy-txt",
  },
};
