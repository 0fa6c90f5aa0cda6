// Markdown pages reach MathJax through pymdownx.arithmatex, which wraps math in \( \) and \[ \].
// Executed notebooks do not: nbconvert leaves the author's $...$ and $$...$$ as they are, so both
// delimiter pairs are accepted, and no class filter is set (notebook math carries no arithmatex class).
// MathJax skips <pre> and <code>, so dollars in code stay text; write \$ for a literal dollar in prose.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: "tex2jax_ignore",
  },
};
