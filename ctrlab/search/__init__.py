"""Architecture searches of the papers (OptEmbed, DNIS, OptFS, ...) on one framework: see ctrlab.search.framework."""
