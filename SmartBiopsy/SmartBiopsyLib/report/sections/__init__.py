"""One module per report section; each exposes one section function (case, figures) -> HTML."""
